"""Template context: the current user's role, for navigation."""

from __future__ import annotations

from typing import Any


def roles(request: Any) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"role": ""}
    return {"role": user.role}
