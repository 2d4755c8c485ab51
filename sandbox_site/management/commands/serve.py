"""Run the web server (uvicorn) and the worker cluster (django-q2) together, in the foreground.

Stops both on Ctrl-C or SIGTERM, and stops the other when one of them exits; nothing either of
them started (web worker processes, the worker cluster's processes) outlives it, VMs excepted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sandbox_site.lanes import lane_threads

# How long the children get to stop (a worker finishes the step it is in) before they are killed.
STOP_TIMEOUT_S = 20


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=settings.SANDBOX_HOST)
        parser.add_argument("--port", type=int, default=settings.SANDBOX_PORT)
        parser.add_argument("--no-worker", action="store_true", help="web only")
        parser.add_argument(
            "--web-workers",
            type=int,
            default=int(os.environ["SANDBOX_WEB_WORKERS"])
            if os.environ.get("SANDBOX_WEB_WORKERS")
            else None,
            help="web processes (default: 1 on the embedded in-memory channel layer, which cannot "
            "join processes; twice the CPU count, at most 8, with REDIS_URL)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        python = sys.executable
        manage = os.path.join(os.getcwd(), "manage.py")
        workers = options["web_workers"]
        if workers is None:
            # Twice the cores: a process runs Python on one core at a time (the GIL), and the
            # kernel spreads keep-alive connections unevenly over processes; with two per core a
            # busy process still finds a core (bench/api.py: p99 from 90 to 16 ms, reads only).
            workers = min(8, 2 * (os.cpu_count() or 1)) if settings.REDIS_URL else 1
        if workers > 1 and not settings.REDIS_URL:
            raise CommandError("several web processes need REDIS_URL (a shared channel layer)")
        # uvicorn in both modes. Python runs one thread at a time per process, so throughput on
        # several cores needs several processes: uvicorn's workers share the listening socket
        # (websockets too), Redis joins their channel layers. Not daphne, even for one process:
        # its HTTP layer (Twisted) parses POSTed form bodies itself and answers a malformed one
        # with an empty 400 of its own before the application sees the request.
        # --no-proxy-headers: forwarded headers are believed from SANDBOX_TRUSTED_PROXIES only,
        # by the application itself (sandbox_site/proxies.py); uvicorn would trust 127.0.0.1.
        web = [python, "-m", "uvicorn", "sandbox_site.asgi:application", "--host", options["host"]]
        web += ["--port", str(options["port"]), "--workers", str(workers), "--no-access-log"]
        web += ["--no-proxy-headers", "--lifespan", "off"]
        commands = {"web": web}
        if not options["no_worker"]:
            commands["worker"] = [python, manage, "worker"]
        # Web processes keep a database connection open per read and write thread (opened at
        # start); the long lane's requests mostly wait on guests and borrow theirs on demand.
        reads, writes, _ = lane_threads()
        web_env = dict(os.environ)
        web_env.setdefault("SANDBOX_DB_POOL_MIN", str(reads + writes))
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        # Each child leads a process group of its own (its session), so that a terminal's Ctrl-C
        # reaches only this command, which stops each child through its leader (django-q2's
        # sentinel and workers must not get the signal themselves: killed inside the cluster's
        # shared locks, they leave the main process waiting forever), and so that whatever a
        # child leaves behind can be killed as a group. VMMs run in sessions of their own and
        # are not part of any of these groups.
        procs = {
            name: subprocess.Popen(
                argv, env=web_env if name == "web" else None, start_new_session=True
            )
            for name, argv in commands.items()
        }
        self.stdout.write(
            f"MicroVM Sandbox on http://{options['host']}:{options['port']}/ ({workers} web) "
            f"({', '.join(f'{n} pid {p.pid}' for n, p in procs.items())}); Ctrl-C stops."
        )
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
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs.values():
            # Past the deadline, or left behind by a leader that exited: nothing of a child's
            # group survives serve (a leftover holds database sessions, even open transactions).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if exit_code:
            sys.exit(exit_code)
