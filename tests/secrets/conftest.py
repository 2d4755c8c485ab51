"""The VM suite's fixtures, for the secrets given to real guests."""

from __future__ import annotations

from tests.vms import conftest as _vms

caller_for, vm_dirs, make_running_vm = _vms.caller_for, _vms.vm_dirs, _vms.make_running_vm
