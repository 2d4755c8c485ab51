"""Template context of the VM domain: what the policy lets the current caller offer on every page.

Pages ask ``vms.policy`` (never the template's ``perms`` of the vms app), so what a template
offers is what the policy allows: "New VM" is shown to a caller who may ask the create verb.
"""

from __future__ import annotations

from typing import Any

from accounts.caller import Caller
from vms import policy


def vm_policy(request: Any) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {
            "may_create": False,
            "may_manage_quotas": False,
            "may_see_usage_rollups": False,
            "may_see_pools": False,
        }
    caller = Caller.from_request(request)
    return {
        "may_create": policy.may_create(caller),
        "may_manage_quotas": policy.may_manage_quotas(caller),
        # Another user's (or a group's, a host's) summed usage history: readers of all VMs.
        "may_see_usage_rollups": policy.may_see_usage_rollups(caller),
        # The warm pools' page (vms.pool_views): its readers and those who set targets.
        "may_see_pools": policy.may_manage_pools(caller, "view"),
    }
