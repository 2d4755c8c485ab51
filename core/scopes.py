"""Token scopes as operations declare them: the permissions an operation accepts.

Every API operation states the permission it needs (its *scope*) in ``token_scopes`` on its view
(or consumer), keyed by action, ``action:method`` or HTTP method::

    token_scopes = {"list": VM_READ, "create": needs("vms.add_virtualmachine")}

Declaring is all an app does; applying a token's scopes to the declared ones is the accounts
app's (``accounts.scopes``, ``accounts.authentication``), which knows the tokens. So any app can
state its operations' scopes without importing the app that holds the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OPEN", "Needs", "needs"]


@dataclass(frozen=True)
class Needs:
    """The permissions an operation accepts as its scope: any one of them will do.

    Empty: the operation needs no permission (``/me/``, the template catalogue, your quota), so
    any token may call it (a read-only token only if it is a read).
    """

    any_of: frozenset[str]

    def allows(self, scopes: list[str]) -> bool:
        return not self.any_of or bool(self.any_of.intersection(scopes))

    def as_list(self) -> list[str]:
        return sorted(self.any_of)


def needs(*perms: str) -> Needs:
    return Needs(frozenset(perms))


OPEN = needs()
