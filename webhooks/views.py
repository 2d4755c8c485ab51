"""The dashboard's Webhooks pages: the list with a new subscription's form (its secret shown
once, on the answer to the form), one subscription's page (settings, a change form, the latest
deliveries with every attempt, ping, disable or enable, a new secret), and deleting on a
confirmation page (the Content-Security-Policy allows no inline script for a dialog).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts.caller import Caller
from webhooks import commands, policy
from webhooks.models import Delivery, Subscription

__all__ = ["action", "delete", "detail", "webhooks_page"]

SHOWN_DELIVERIES = 50
VERBS = ("ping", "enable", "disable", "rotate")


class SubscriptionForm(forms.Form):
    url = forms.CharField(
        label="URL",
        max_length=2048,
        widget=forms.URLInput(attrs={"placeholder": "https://hooks.example.com/sandbox"}),
        help_text="http or https; deliveries are POSTed here, signed.",
    )
    description = forms.CharField(max_length=200, required=False)
    event_types = forms.CharField(
        label="Event types",
        max_length=2000,
        help_text="Types or globs, separated by spaces or commas: vm.* snapshot.created *",
    )
    vm_ids = forms.CharField(
        label="Only these VMs", required=False, max_length=4000, help_text="VM ids (optional)."
    )
    owners = forms.CharField(
        label="Only VMs of these users", required=False, max_length=2000, help_text="Usernames."
    )
    allow_private = forms.BooleanField(
        label="Allow loopback and private addresses",
        required=False,
        help_text="Administrators only: a receiver inside your own network.",
    )

    def __init__(self, *args: Any, may_allow_private: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not may_allow_private:
            del self.fields["allow_private"]


def _errors_into(form: forms.Form, exc: ValidationError) -> None:
    for field, errors in exc.message_dict.items():
        form.add_error(field if field in form.fields else None, errors)


def _visible(request: HttpRequest, pk: Any) -> Subscription:
    try:
        return commands.visible_or_404(Caller.from_request(request), pk)
    except Subscription.DoesNotExist as exc:
        raise Http404("no such webhook subscription") from exc


def _may_subscribe_or_see(caller: Caller) -> bool:
    return any(caller.has(p) for p in policy.SUBSCRIPTION_READ.as_list())


@login_required
def webhooks_page(request: HttpRequest) -> HttpResponse:
    caller = Caller.from_request(request)
    if not _may_subscribe_or_see(caller):
        raise PermissionDenied("you may not use webhooks")
    may_add = caller.has(policy.SUBSCRIBE)
    may_private = caller.has(policy.ALLOW_PRIVATE)
    form = SubscriptionForm(request.POST or None, may_allow_private=may_private)
    issued = None
    if request.method == "POST" and may_add and form.is_valid():
        data = form.cleaned_data
        try:
            issued = commands.subscribe(
                caller,
                url=data["url"],
                event_types=data["event_types"],
                vm_ids=data["vm_ids"],
                owners=data["owners"],
                description=data["description"],
                allow_private=data.get("allow_private", False),
            )
        except ValidationError as exc:
            _errors_into(form, exc)
        except PermissionDenied as exc:
            form.add_error(None, str(exc))
        else:
            form = SubscriptionForm(may_allow_private=may_private)
    subscriptions = policy.visible_subscriptions(caller)
    context: dict[str, Any] = {
        "form": form,
        "may_add": may_add,
        "issued": issued,
        "subscriptions": [(s, policy.may_act_on(caller, s)) for s in subscriptions],
    }
    return render(request, "webhooks/list.html", context)


def _edit_form(sub: Subscription, data: Any, may_private: bool) -> SubscriptionForm:
    initial = {
        "url": sub.url,
        "description": sub.description,
        "event_types": " ".join(sub.event_types),
        "vm_ids": " ".join(sub.vm_ids),
        "owners": " ".join(sub.owners),
        "allow_private": sub.allow_private,
    }
    form = SubscriptionForm(data, initial=initial, may_allow_private=may_private)
    form.auto_id = "edit_%s"
    return form


def _page(request: HttpRequest, sub: Subscription, **extra: Any) -> HttpResponse:
    caller = Caller.from_request(request)
    deliveries = (
        Delivery.objects.filter(subscription=sub)
        .prefetch_related("tries")
        .order_by("-event_position")[:SHOWN_DELIVERIES]
    )
    context: dict[str, Any] = {
        "sub": sub,
        "mine": policy.may_act_on(caller, sub) and caller.has(policy.CHANGE),
        "may_delete": policy.may_act_on(caller, sub) and caller.has(policy.DELETE),
        "deliveries": deliveries,
        "edit_form": extra.pop("edit_form", None)
        or _edit_form(sub, None, caller.has(policy.ALLOW_PRIVATE)),
        **extra,
    }
    return render(request, "webhooks/detail.html", context)


@login_required
def detail(request: HttpRequest, pk: Any) -> HttpResponse:
    """The subscription's page; a POST is its change form."""
    caller = Caller.from_request(request)
    sub = _visible(request, pk)
    if request.method != "POST":
        return _page(request, sub)
    form = _edit_form(sub, request.POST, caller.has(policy.ALLOW_PRIVATE))
    if form.is_valid():
        data = form.cleaned_data
        try:
            commands.update(
                caller,
                sub,
                url=data["url"],
                event_types=data["event_types"],
                vm_ids=data["vm_ids"],
                owners=data["owners"],
                description=data["description"],
                allow_private=data.get("allow_private") if "allow_private" in form.fields else None,
            )
        except ValidationError as exc:
            _errors_into(form, exc)
        except PermissionDenied as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, "Webhook subscription saved.")
            return redirect("webhooks:detail", pk=sub.pk)
    return _page(request, sub, edit_form=form)


@login_required
@require_POST
def action(request: HttpRequest, pk: Any, verb: str) -> HttpResponse:
    if verb not in VERBS:
        raise Http404("no such action")
    caller = Caller.from_request(request)
    sub = _visible(request, pk)
    try:
        if verb == "rotate":
            issued = commands.rotate_secret(caller, sub)
            return _page(request, issued.subscription, issued=issued)
        if verb == "ping":
            event = commands.ping(caller, sub)
            messages.success(
                request, f"Ping recorded (event #{event.position}): its delivery shows below."
            )
        elif verb == "enable":
            commands.enable(caller, sub)
            messages.success(request, "Enabled: events from now on are delivered.")
        else:
            commands.disable(caller, sub)
            messages.success(request, "Disabled: pending deliveries were cancelled.")
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    except PermissionDenied as exc:
        messages.error(request, str(exc))
    except Subscription.DoesNotExist as exc:
        raise Http404("no such webhook subscription") from exc
    return redirect("webhooks:detail", pk=sub.pk)


@login_required
def delete(request: HttpRequest, pk: Any) -> HttpResponse:
    caller = Caller.from_request(request)
    sub = _visible(request, pk)
    if request.method == "POST":
        try:
            commands.delete(caller, sub)
        except PermissionDenied as exc:
            messages.error(request, f"Not deleted: {exc}")
            return redirect("webhooks:detail", pk=sub.pk)
        except Subscription.DoesNotExist:
            pass
        messages.success(request, "Webhook subscription deleted.")
        return redirect("webhooks:list")
    return render(request, "webhooks/delete.html", {"sub": sub})
