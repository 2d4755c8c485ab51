"""Run the web server (daphne) and the worker cluster (django-q2) together, in the foreground.

Stops both on Ctrl-C or SIGTERM, and stops the other when one of them exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("SANDBOX_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("SANDBOX_PORT", "8000")))
        parser.add_argument("--no-worker", action="store_true", help="web only")

    def handle(self, *args: Any, **options: Any) -> None:
        python = sys.executable
        manage = os.path.join(os.getcwd(), "manage.py")
        commands = {
            "web": [
                python,
                "-m",
                "daphne",
                "-b",
                options["host"],
                "-p",
                str(options["port"]),
                "--proxy-headers",
                "sandbox_site.asgi:application",
            ]
        }
        if not options["no_worker"]:
            commands["worker"] = [python, manage, "worker"]
        procs = {name: subprocess.Popen(argv) for name, argv in commands.items()}
        self.stdout.write(
            f"MicroVM Sandbox on http://{options['host']}:{options['port']}/ "
            f"({', '.join(f'{n} pid {p.pid}' for n, p in procs.items())}); Ctrl-C stops."
        )
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exit_code = 0
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    self.stderr.write(f"{name} exited with {proc.returncode}; stopping")
                    exit_code = proc.returncode or 1
                    stopping = True
            time.sleep(0.5)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if exit_code:
            sys.exit(exit_code)
