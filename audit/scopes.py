"""The token scopes of the audit log's API operations (``core.scopes``)."""

from __future__ import annotations

from core.scopes import needs

__all__ = ["AUDIT_READ", "EXPORT"]

AUDIT_READ = needs("audit.view_audit_trail")
EXPORT = needs("audit.export_audit")
