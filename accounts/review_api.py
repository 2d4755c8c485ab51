"""Read-only access review for auditors: ``GET /api/v1/audit/accounts/`` (see accounts.review)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import review
from accounts.scopes import AUDIT_READ
from audit import commands
from core.permissions import HasPerm

VIEW = "audit.view_audit_trail"


def _listed(request: object, what: str, data: dict) -> None:
    commands.record_accounts_listed(
        request,
        what,
        {
            "users": len(data["users"]),
            "tokens": len(data["tokens"]),
            "differences": len(data["differences_from_log"]),
        },
    )


class AccountsReviewView(APIView):
    """Every user (role, superuser, active), role (members, permissions) and API token (scopes,
    read-only flag, addresses, expiry, revocation, last use) as the database holds them, the
    differences from what the audit log says, and the grants and revocations of the last 90
    days. Read-only; the listing is an ``audit.accounts_listed`` event."""

    permission_classes = [IsAuthenticated, HasPerm.of(VIEW)]
    token_scopes = {"get": AUDIT_READ}

    @extend_schema(
        responses=inline_serializer(
            "AccountsReview",
            {
                "users": serializers.JSONField(),
                "roles": serializers.JSONField(),
                "tokens": serializers.JSONField(),
                "differences_from_log": serializers.ListField(child=serializers.CharField()),
                "changes": serializers.JSONField(),
            },
        )
    )
    def get(self, request: Request) -> Response:
        data = review.review()
        _listed(request, "api.accounts", data)
        return Response(data)


@require_GET
@login_required
@permission_required(VIEW, raise_exception=True)
def accounts_page(request: HttpRequest) -> HttpResponse:
    """The dashboard's *Users & access* page (auditors and admins, read-only)."""
    data = review.review()
    _listed(request, "dashboard.accounts", data)
    return render(request, "audit/accounts.html", {"review": data, "section": "accounts"})
