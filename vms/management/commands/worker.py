"""Run this host's worker: set up the product's network namespace (when networking is on),
reconcile VMs with the VMM processes that exist, then the django-q2 cluster. Interrupted requests
are settled before new work is taken.

The cluster runs in a fresh process (exec after the reconcile), whose main process also sends
the heartbeat tasks that ``/readyz`` checks (``vms.heartbeat``), runs the apps' quick checks
every second (``core.ticks``: the webhook pump starts from there) and, when web processes are
joined by Redis, runs the console relay (``vms.console``: the one reader of each VM's serial
socket). It exits 0 when stopped by
SIGTERM or SIGINT (after the cluster has stopped its processes) and 1 when the cluster's
sentinel dies on its own, so that ``serve`` or a service manager notices. The cluster's main
process also runs the port forwarder (``vms.forwarder``: host ports on SANDBOX_FORWARD_BIND to
the VMs' forwards); at a stop it removes the network namespace unless SANDBOX_NETNS_KEEP is set
or a VM still has its NIC plugged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connections
from django.utils import timezone

from core import context, ticks
from vms import console, forwarder, heartbeat, task_guard, vmnet
from vms.reconcile import reconcile

log = logging.getLogger("sandbox.vms.worker")


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        # The second stage, after the reconcile (this command execs itself with it).
        parser.add_argument("--cluster-only", action="store_true", help=argparse.SUPPRESS)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["cluster_only"]:
            sys.exit(run_cluster())
        with context.bind(channel="worker"):
            try:
                hn = vmnet.setup()
            except Exception as exc:
                if settings.SANDBOX_NETWORKING == "on":
                    raise CommandError(f"cannot set up the network namespace: {exc}") from exc
                # auto: the worker runs; VMs with a NIC fail to start, saying why.
                log.exception("cannot set up the network namespace")
                hn = None
            if hn is not None:
                self.stdout.write(f"network namespace {hn.netns} ready")
            counts = reconcile(startup=True)
        self.stdout.write("reconciled: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        sys.stdout.flush()
        manage = os.path.join(os.getcwd(), "manage.py")
        # A fresh process for the cluster: nothing of the reconcile (threads, open connections)
        # is there when django-q2 forks its processes.
        argv = [sys.executable, manage, "worker", "--cluster-only"]
        os.execv(sys.executable, argv)  # noqa: S606 - fixed argv


def run_cluster() -> int:
    from django_q.cluster import Cluster

    task_guard.install()  # before any process is forked: only the product's tasks run
    cluster = Cluster()  # installs the SIGTERM/SIGINT handlers that stop the cluster
    heartbeat.started(timezone.now())
    connections.close_all()
    cluster.start()
    if console.relay_placement() == "worker":
        # After the cluster's processes are forked (they fork from the sentinel from now on):
        # a thread in a process that forks is a hazard.
        console.run_relay_thread()
    forwarding = threading.Event()
    hn = vmnet.host()
    if hn is not None:
        # Host ports of the VMs' forwards (after the fork, as the relay: a thread of its own).
        relay = forwarder.Forwarder(settings.SANDBOX_FORWARD_BIND, hn.link.ns_address, hn.host_ns)
        forwarder.run_thread(relay, vmnet.wanted_forwards, forwarding)
    last_sent = None
    while cluster.sentinel is not None and cluster.sentinel.is_alive():
        now = timezone.now()
        try:
            if heartbeat.due(last_sent, now):
                heartbeat.send(now)
                last_sent = now
        except DatabaseError:
            log.warning("worker heartbeat not sent", exc_info=True)
        try:
            # The apps' own quick checks (webhook deliveries to start: core.ticks).
            ticks.run(now)
        finally:
            connections.close_all()
        time.sleep(1.0)
    forwarding.set()
    if cluster.has_stopped:
        try:
            vmnet.teardown_if_idle()
        except Exception:
            log.exception("removing the network namespace failed")
        return 0  # stopped by a signal, its processes with it
    log.error("the worker cluster's sentinel died (exit code %s)", cluster.sentinel.exitcode)
    return 1
