# MicroVM Sandbox: `make run` (the dashboard on http://127.0.0.1:8000) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Debian packages the product and its tests use (QEMU guests, image building, browser tests).
SYSTEM_PACKAGES := qemu-system-x86 qemu-utils ovmf debootstrap busybox-static e2fsprogs mtools \
	fdisk dosfstools systemd-boot-efi binutils zstd cpio kmod iproute2 nftables dnsmasq-base \
	chromium chromium-driver
# Installed from Debian only when the command is missing (a machine may have its own Node.js).
COMMAND_PACKAGES := node:nodejs npm:npm

.PHONY: help run test test-sqlite lint scan format check deps system-deps frontend images bench clean screenshots
# A bare `make` (or `make -p` to read the variables) only prints this: `run` serves, and as
# root sets up the product's network namespace, so it is never run by accident.
.DEFAULT_GOAL := help

help:
	@echo "make run     the dashboard and worker on http://127.0.0.1:8000 (installs what it needs)"
	@echo "make test    the whole suite (DATABASE_URL, REDIS_URL: docs/operations.md)"
	@echo "other goals: test-sqlite lint format check deps system-deps frontend images bench scan screenshots clean"

run: deps frontend images
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap_admin
	$(PY) manage.py serve

test: deps frontend
	$(PY) -m pytest $(PYTEST_ARGS)

# The event store, account and serving suites on the embedded SQLite default (CI runs both).
test-sqlite: deps
	env -u DATABASE_URL -u REDIS_URL $(PY) -m pytest tests/audit tests/accounts tests/test_platform.py tests/test_serving.py $(PYTEST_ARGS)

deps: $(VENV)/.installed

# The SDK and the `sandbox` CLI are a package of their own (sdk/), installed beside for the tests,
# with its mcp extra (`sandbox mcp`).
$(VENV)/.installed: pyproject.toml sdk/pyproject.toml
	@command -v qemu-system-x86_64 >/dev/null && command -v npm >/dev/null || $(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q -e './sdk[mcp]'
	touch $@

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done; \
		for cp in $(COMMAND_PACKAGES); do command -v $${cp%%:*} >/dev/null || echo $${cp#*:}; done; \
		$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

frontend: static/build/.built

static/build/.built: frontend/package.json frontend/package-lock.json frontend/build.mjs $(wildcard frontend/src/*.js)
	cd frontend && npm ci --no-audit --no-fund --loglevel=error && npm run build

images: deps
	@if [ "$$(id -u)" = 0 ]; then $(PY) images/build.py --uefi; else sudo $(PY) images/build.py --uefi; fi

# The typed core: the event store, accounts' commands and auth, the VM domain and its drivers.
MYPY_CORE := audit/store.py audit/hashing.py audit/verify.py audit/digests.py audit/projections.py \
	audit/catalogue.py audit/actor.py audit/errors.py audit/offline.py accounts/commands.py \
	accounts/tokens.py accounts/caller.py accounts/backends.py accounts/permission_cache.py vms/commands.py vms/quotas.py \
	vms/projectors.py vms/worker.py vms/guest.py vms/reconcile.py vms/hypervisors vms/agent \
	vms/live.py vms/console.py vms/consumers.py vms/metrics_live.py vms/exec_consumer.py \
	vms/identity.py sandbox_site/lanes.py core/compiled.py core/pagination.py \
	core/postgres.py
# Each app's metrics, the event table under the store, what core gives every app.
MYPY_CORE += audit/events.py audit/metrics.py vms/metrics.py vms/recordings.py core/metrics.py \
	core/scopes.py core/permissions.py
# The lifecycle table and what it drives.
MYPY_CORE += vms/lifecycle.py vms/policy.py vms/enqueue.py vms/tasks.py vms/lifetimes.py vms/idle.py
# Usage history: sampling, folding, the tier planner and its API.
MYPY_CORE += vms/usage.py vms/usage_api.py
# Preview URLs: grants, access decisions, the link endpoint and dashboard views, the proxy.
MYPY_CORE += vms/previews.py vms/preview_access.py vms/preview_api.py vms/preview_views.py \
	sandbox_site/preview.py sandbox_site/upstream.py
# Networking: the host side (namespaces, bridges, rules, resolvers, TAPs), its plumbing and API.
MYPY_CORE += vms/network vms/netconfig.py vms/netplumb.py vms/vmnet.py vms/forwarder.py \
	vms/network_api.py sandbox_site/checks.py
# The SDK and the CLI (a package of their own, without Django).
MYPY_CORE += sdk/sandbox_sdk
# Networks and egress evidence on the dashboard.
MYPY_CORE += vms/network_views.py vms/netevidence.py
# The secrets store: keys, values, masking, who may use them.
MYPY_CORE += secretstore
# Webhooks: subscriptions, targets (SSRF), signing, the dispatcher and its pump.
MYPY_CORE += webhooks core/ticks.py

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_CORE)
	PYTHONPATH=. $(VENV)/bin/lint-imports --no-cache

# Vulnerability scanning (docs/security.md): bandit on the product's code, the installed Python
# distributions against advisory data, npm audit of the front end; fails on high severity.
scan: deps
	$(PY) -m security.scan

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

check: deps
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

bench: deps
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The screenshots of docs/dashboard.md, taken again by the browser tests that make them
# (artifacts/dashboard/) and copied into docs/screenshots/.
SHOTS = pages/operator-home-1280 pages/operator-vms-1280 pages/operator-vms-390-dark \
	pages/operator-vms-id-1280 pages/operator-tasks-1280 \
	pages/operator-home-390-dark usage-history-1h
screenshots: deps frontend images
	$(PY) -m pytest -q "tests/dashboard/test_every_page.py::test_every_page_fits_and_passes_axe[operator]" tests/dashboard/test_usage_chart.py
	mkdir -p docs/screenshots
	for s in $(SHOTS); do cp artifacts/dashboard/$$s.png docs/screenshots/$$(basename $$s).png; done

clean:
	rm -rf static/build frontend/node_modules var/staticfiles
