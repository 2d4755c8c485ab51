"""Every change to accounts, roles, tokens and login security: one function per verb.

Each takes the actor explicitly, checks, writes its rows and appends its event in one
transaction. Views, forms and management commands call these; they never write these models or
events themselves.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import EllipsisType

from django.conf import settings
from django.contrib.auth import password_validation
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts import roles, throttle, tokens
from accounts.models import APIToken, LoginState, User
from accounts.scopes import SCOPES as KNOWN_SCOPES
from accounts.scopes import SELF_SERVICE
from audit import commands as audit_commands
from audit import store
from audit.actor import Actor
from core import keyfiles

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "Conflict",
    "change_password",
    "IssuedToken",
    "create_token",
    "create_user",
    "disable_password_login",
    "is_locked",
    "lock_ends",
    "normalize_username",
    "record_login",
    "record_login_failure",
    "record_logout",
    "record_token_rejected",
    "revoke_token",
    "set_active",
    "set_role",
    "unlock",
]


def normalize_username(username: str) -> str:
    return (username or "").strip()[:150] or "(empty)"


_normalize_username = normalize_username


def _require(actor_user: User | None, perm: str) -> None:
    if actor_user is None or not actor_user.has_perm(perm):
        raise PermissionDenied(f"you need the {perm} permission")


# --- Users and roles --------------------------------------------------------------------------


def _role_permissions(role: str) -> set[str]:
    rows = Permission.objects.filter(group__name=role).values_list(
        "content_type__app_label", "codename"
    )
    return {f"{app}.{codename}" for app, codename in rows}


def _require_token_covers(token: APIToken | None, *role_names: str) -> None:
    """A scoped token may only give or take a role whose permissions all lie within its scopes
    (else it could make an admin and log in as it): the admin role, and any role beyond the
    token, needs a token without scopes, or a session."""
    if token is None or not token.scopes:
        return
    for role in dict.fromkeys(r for r in role_names if r):
        beyond = sorted(_role_permissions(role) - set(token.scopes))
        if role == roles.ADMIN or beyond:
            shown = ", ".join(beyond[:3]) + (", ..." if len(beyond) > 3 else "")
            raise PermissionDenied(
                f"this API token's scopes do not cover the {role} role ({shown}): "
                "use a token without scopes"
            )


def _apply_role(user: User, role: str) -> None:
    """Make ``role`` the user's one role. The admin role IS Django's superuser (and staff) flag:
    both are written here, together, so that they can never disagree."""
    admin = role == roles.ADMIN
    if user.is_superuser != admin or user.is_staff != admin:
        user.is_superuser = user.is_staff = admin
        user.save(update_fields=["is_superuser", "is_staff"])
    user.groups.remove(*Group.objects.filter(name__in=roles.ROLES).exclude(name=role))
    user.groups.add(Group.objects.get(name=role))


@transaction.atomic
def create_user(
    actor: Actor,
    *,
    username: str,
    role: str,
    password: str | None = None,
    email: str | None = "",
    by: User | None = None,
    token: APIToken | None = None,
) -> User:
    """Create a user with a role. ``by`` is the acting user (None for the shell/bootstrap).

    ``password`` None or empty: no password login (API tokens only). The admin role makes the
    user a Django superuser; no other path sets that flag. ``token``: the API token the request
    came with; a scoped one may only create a role within its scopes.
    """
    if by is not None:
        _require(by, "accounts.manage_users")
    if role not in roles.ROLES:
        raise ValidationError({"role": f"role must be one of {', '.join(roles.ROLES)}"})
    _require_token_covers(token, role)
    user = User(username=username, email=email or "")
    user.full_clean(exclude=["password"])
    if password:
        try:
            password_validation.validate_password(password, user)
        except ValidationError as exc:
            raise ValidationError({"password": exc.messages}) from exc
        user.set_password(password)
    else:
        user.set_unusable_password()
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError as exc:
        # A concurrent create of the same name passed full_clean's check before this one saved.
        raise ValidationError({"username": "a user with that username already exists"}) from exc
    _apply_role(user, role)
    store.append(
        "user",
        str(user.pk),
        "user.created",
        {"username": user.username, "role": role, "superuser": user.is_superuser},
        actor=actor,
        expected_version=0,
    )
    return user


class Conflict(Exception):
    """The change is refused because of the state it would leave (the API answers 409)."""


def _lock_users(by: User | None, user: User) -> tuple[User | None, User, list[User]]:
    """Lock the acting user, the target and every active admin, in primary-key order (two
    changes lock in the same order, so they wait for each other instead of deadlocking), and
    return them as stored now: the actor's authority and the admins left are checked on these."""
    ids = {user.pk} | ({by.pk} if by is not None else set())
    rows = list(
        User.objects.select_for_update()
        .filter(Q(pk__in=ids) | Q(is_superuser=True, is_active=True))
        .order_by("pk")
    )
    found = {row.pk: row for row in rows}
    if user.pk not in found:
        raise ValidationError({"user": "no such user"})
    actor_row = found.get(by.pk) if by is not None else None
    if by is not None:
        if actor_row is None:
            raise PermissionDenied("you need the accounts.manage_users permission")
        _require(actor_row, "accounts.manage_users")
    admins = [row for row in rows if row.is_superuser and row.is_active]
    return actor_row, found[user.pk], admins


def _require_another_admin(target: User, admins: list[User], doing: str) -> None:
    if target.is_superuser and target.is_active and not [a for a in admins if a.pk != target.pk]:
        raise Conflict(
            f"{target.username} is the last active admin: {doing} would leave no admin "
            "(make another user admin first)"
        )


@transaction.atomic
def set_role(
    actor: Actor,
    user: User,
    role: str,
    *,
    by: User | None = None,
    token: APIToken | None = None,
) -> User:
    """Change ``user``'s role; returns the user as stored after the change.

    The acting user, the target and the admins are locked (``_lock_users``) and the actor's
    authority and the previous role read from the database inside the transaction; the last
    active admin keeps its role (``Conflict``). A scoped ``token`` may only give or take roles
    within its scopes. The event names the role read back after the change, so it says what was
    done.
    """
    if by is not None:
        _require(by, "accounts.manage_users")
        if by.pk == user.pk:
            raise PermissionDenied("you cannot change your own role")
    if role not in roles.ROLES:
        raise ValidationError({"role": f"role must be one of {', '.join(roles.ROLES)}"})
    _, current, admins = _lock_users(by, user)
    previous = roles.role_of(current)
    _require_token_covers(token, role, previous)
    if previous == role and current.is_superuser == (role == roles.ADMIN):
        return current
    if role != roles.ADMIN:
        _require_another_admin(current, admins, f"making it {role}")
    _apply_role(current, role)
    current = User.objects.get(pk=user.pk)
    store.append(
        "user",
        str(current.pk),
        "user.role_changed",
        {"username": current.username, "from": previous, "to": roles.role_of(current)},
        actor=actor,
    )
    return current


@transaction.atomic
def set_active(
    actor: Actor,
    user: User,
    active: bool,
    *,
    by: User | None = None,
    token: APIToken | None = None,
) -> None:
    """Deactivate or reactivate ``user``, with the same locks and checks as ``set_role``: the
    last active admin is not deactivated."""
    if by is not None:
        _require(by, "accounts.manage_users")
        if by.pk == user.pk:
            raise PermissionDenied("you cannot deactivate yourself")
    _, current, admins = _lock_users(by, user)
    _require_token_covers(token, roles.role_of(current))
    if current.is_active == active:
        return
    if not active:
        _require_another_admin(current, admins, "deactivating it")
    current.is_active = active
    current.save(update_fields=["is_active"])
    user.is_active = active
    store.append(
        "user",
        str(current.pk),
        "user.reactivated" if active else "user.deactivated",
        {"username": current.username},
        actor=actor,
    )
    if not active:
        # A deactivated user's tokens die with the account, as revoke_token revokes them: each
        # a token.revoked event, and with each every live token it issued (for any user).
        for token in APIToken.objects.filter(user=current, revoked_at__isnull=True).order_by("pk"):
            _revoke_family(actor, token)


@transaction.atomic
def change_password(actor: Actor, user: User, password: str, *, by: User | None = None) -> None:
    """Set ``user``'s password (a ``user.password_changed`` event, never the password). A user
    may change its own; another's needs ``accounts.manage_users``. Django's validators apply.
    Every path comes here: the Django admin's password page and ``manage.py changepassword``
    (``accounts.admin``, ``accounts/management/commands/changepassword.py``)."""
    if by is not None and by.pk != user.pk:
        _require(by, "accounts.manage_users")
    try:
        password_validation.validate_password(password, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from exc
    current = User.objects.select_for_update().get(pk=user.pk)
    current.set_password(password)
    current.save(update_fields=["password"])
    user.password = current.password
    store.append(
        "user",
        str(current.pk),
        "user.password_changed",
        {"username": current.username, "by_self": by is not None and by.pk == user.pk},
        actor=actor,
    )


@transaction.atomic
def disable_password_login(actor: Actor, user: User, *, by: User | None = None) -> bool:
    """Take away ``user``'s password, leaving an account for API tokens only (as one created
    without a password): a ``user.password_changed`` event with ``"password_login": false``, so
    that whatever follows password changes (open sockets re-checked, browser sessions ended)
    follows this too. ``change_password`` gives one back. Needs ``accounts.manage_users``;
    False, and nothing recorded, when the user has no password login already."""
    if by is not None:
        _require(by, "accounts.manage_users")
    current = User.objects.select_for_update().get(pk=user.pk)
    if not current.has_usable_password():
        return False
    current.set_unusable_password()
    current.save(update_fields=["password"])
    user.password = current.password
    store.append(
        "user",
        str(current.pk),
        "user.password_changed",
        {
            "username": current.username,
            "by_self": by is not None and by.pk == user.pk,
            "password_login": False,
        },
        actor=actor,
    )
    return True


# --- API tokens -------------------------------------------------------------------------------


DEFAULT_EXPIRY_DAYS = 90


@dataclass(frozen=True)
class IssuedToken:
    token: APIToken
    plaintext: str  # shown once, never stored


def _validate_ips(allowed_ips: list[str]) -> list[str]:
    out = []
    for item in allowed_ips:
        if "%" in str(item):
            # A zone names an interface of one host; client addresses never carry one (a
            # forwarded address with a zone is refused), so such an entry could never match.
            raise ValidationError(
                {"allowed_ips": f"{item!r}: an address with a zone (%...) is not accepted"}
            )
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValidationError(
                {"allowed_ips": f"{item!r} is not an IP address or network"}
            ) from exc
    return out


def _within(networks: list[str], parents: list[str]) -> list[str]:
    """The networks of ``networks`` that lie in none of ``parents``."""
    outer = [ipaddress.ip_network(p, strict=False) for p in parents]
    beyond = []
    for item in networks:
        net = ipaddress.ip_network(item, strict=False)
        if not any(net.version == p.version and net.subnet_of(p) for p in outer):  # type: ignore[arg-type]
            beyond.append(item)
    return beyond


@transaction.atomic
def create_token(
    actor: Actor,
    user: User,
    *,
    name: str,
    expires_days: int | EllipsisType | None = ...,
    read_only: bool = False,
    allowed_ips: list[str] | None = None,
    scopes: list[str] | None = None,
    by: User | None = None,
    parent: APIToken | None = None,
) -> IssuedToken:
    """Issue a token for ``user``. A user may issue its own; others need manage_all_tokens.

    ``expires_days`` left out means DEFAULT_EXPIRY_DAYS (cut to the issuing token's expiry);
    ``None`` (never expires) is for the shell only: with ``by`` or ``parent`` set,
    a token expires within SANDBOX_TOKEN_MAX_DAYS. ``parent`` is the token the request came
    with: the new token never exceeds it (its scopes a subset, its networks inside the parent's,
    its expiry no later; a read-only token issues none). Scopes and networks left empty are
    inherited from the parent; an expiry left to the default is cut to the parent's.
    """
    if by is not None and by.pk != user.pk:
        _require(by, "accounts.manage_all_tokens")
    if parent is not None:
        _require_parent_allows(parent, user, by)
        # Locked, so that a revocation of the issuer cannot miss a token issued meanwhile.
        parent = APIToken.objects.select_for_update().get(pk=parent.pk)
        if not parent.is_active:
            raise PermissionDenied("the issuing API token is revoked or expired")
    if not user.is_active:
        raise ValidationError({"user": "the user is inactive"})
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError({"name": "a name of 1 to 100 characters is required"})
    max_days = settings.SANDBOX_TOKEN_MAX_DAYS
    explicit_expiry = expires_days is not ...
    if isinstance(expires_days, EllipsisType):
        expires_days = min(DEFAULT_EXPIRY_DAYS, max_days)
    if expires_days is None and (by is not None or parent is not None):
        raise ValidationError({"expires_days": f"a token must expire: give 1 to {max_days} days"})
    if expires_days is not None and not (1 <= expires_days <= max_days):
        raise ValidationError({"expires_days": f"must be between 1 and {max_days} days"})
    ips = _validate_ips(allowed_ips or [])
    scopes = sorted(set(scopes or []))
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise ValidationError({"scopes": f"unknown scopes {unknown}; known: {list(KNOWN_SCOPES)}"})
    beyond = [s for s in scopes if s not in SELF_SERVICE and not user.has_perm(s)]
    if beyond:
        # A token never exceeds its user.
        raise ValidationError({"scopes": f"{user.username} does not hold {beyond}"})
    now = timezone.now()
    expires_at = now + timedelta(days=expires_days) if expires_days is not None else None
    if parent is not None:
        # A token never exceeds the token that issued it.
        if parent.scopes:
            beyond = [s for s in scopes if s not in parent.scopes]
            if beyond:
                raise ValidationError({"scopes": f"the issuing token does not hold {beyond}"})
            scopes = scopes or sorted(parent.scopes)
        if parent.allowed_ips:
            beyond = _within(ips, parent.allowed_ips)
            if beyond:
                raise ValidationError(
                    {"allowed_ips": f"{beyond} lie outside the issuing token's networks"}
                )
            ips = ips or list(parent.allowed_ips)
        if parent.expires_at is not None and (expires_at is None or expires_at > parent.expires_at):
            if explicit_expiry:
                raise ValidationError(
                    {
                        "expires_days": "the issuing token expires at "
                        f"{parent.expires_at.isoformat()}: the new one may not outlive it"
                    }
                )
            expires_at = parent.expires_at
        read_only = read_only or parent.read_only
    key, secret, plaintext = tokens.generate()
    version = settings.SANDBOX_TOKEN_PEPPER_CURRENT
    token = APIToken.objects.create(
        key=key,
        digest=tokens.digest(secret, version),
        pepper_version=version,
        user=user,
        name=name,
        created_at=now,
        expires_at=expires_at,
        read_only=read_only,
        allowed_ips=ips,
        scopes=scopes,
        parent=parent,
    )
    store.append(
        "token",
        key,
        "token.created",
        {
            "token_id": key,
            "name": name,
            "user_id": user.pk,
            "username": user.username,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            "read_only": read_only,
            "allowed_ips": ips,
            "scopes": scopes,
            "issued_by_token": parent.key if parent is not None else None,
        },
        actor=actor,
        expected_version=0,
    )
    return IssuedToken(token, plaintext)


def _require_parent_allows(parent: APIToken, user: User, by: User | None) -> None:
    """The issuing token may issue at all: not read-only, holding add_apitoken if scoped, and
    for another user's token only if it holds manage_all_tokens too."""
    if parent.read_only:
        raise PermissionDenied("a read-only API token cannot issue tokens")
    wanted = ["accounts.add_apitoken"]
    if by is not None and by.pk != user.pk:
        wanted.append("accounts.manage_all_tokens")
    missing = [p for p in wanted if parent.scopes and p not in parent.scopes]
    if missing:
        raise PermissionDenied(f"this API token does not hold {' and '.join(missing)}")


def rehash_token(token: APIToken, secret: str) -> bool:
    """Re-hash ``token``, found live under an older pepper, with the current one: its secret is
    at hand only while it is used. A ``token.rehashed`` event names both pepper key ids. Once no
    live token uses an old pepper, ``manage.py retire_key token-pepper`` can remove it."""
    current = settings.SANDBOX_TOKEN_PEPPER_CURRENT
    previous = token.pepper_version
    if previous == current:
        return False
    new_digest = tokens.digest(secret, current)
    with transaction.atomic():
        # Only from the version seen: two requests with the same token re-hash it once.
        moved = APIToken.objects.filter(pk=token.pk, pepper_version=previous).update(
            digest=new_digest, pepper_version=current
        )
        if not moved:
            return False
        store.append(
            "token",
            token.key,
            "token.rehashed",
            {
                "token_id": token.key,
                "username": token.user.username,
                "pepper": tokens.pepper_key_id(current),
                "previous_pepper": tokens.pepper_key_id(previous),
            },
            actor=Actor.system(channel="auth", name="token_rehash"),
        )
    token.digest, token.pepper_version = new_digest, current
    return True


def live_tokens_on_pepper(version: int) -> int:
    """Live tokens (neither revoked nor expired) still hashed with pepper ``version``."""
    return (
        APIToken.objects.filter(pepper_version=version, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .count()
    )


def rotate_token_pepper(actor: Actor) -> tuple[str, str]:
    """A new pepper version (current after a restart): (previous key id, new key id). Tokens
    hashed with the old one keep working, and are re-hashed at their next use."""
    return audit_commands.rotate_key_file(actor, keyfiles.TOKEN_PEPPER)


def retire_token_pepper(actor: Actor, key_id: str, *, force: bool = False) -> None:
    """Remove a former pepper: tokens still hashed with it are refused from then on (so refused
    without ``force`` while live ones remain)."""
    version = keyfiles.TOKEN_PEPPER.version_of(key_id)
    in_use = live_tokens_on_pepper(version) if version is not None else 0
    audit_commands.retire_key_file(actor, keyfiles.TOKEN_PEPPER, key_id, in_use=in_use, force=force)


def _django_secret_from_files() -> None:
    if os.environ.get("DJANGO_SECRET_KEY"):
        raise audit_commands.KeyRotationRefused(
            "SECRET_KEY comes from DJANGO_SECRET_KEY: rotate it there (the old value into "
            'DJANGO_SECRET_KEY_FALLBACKS; docs/security.md, "Key rotation")'
        )


def rotate_django_secret(actor: Actor) -> tuple[str, str]:
    """A new Django secret (SECRET_KEY after a restart), the old one a fallback: sessions and
    signed values (preview grants and links) made before keep working until it is retired."""
    _django_secret_from_files()
    return audit_commands.rotate_key_file(actor, keyfiles.DJANGO_SECRET)


def retire_django_secret(actor: Actor, key_id: str) -> None:
    """Remove a former Django secret: sessions and signed values made under it stop working."""
    _django_secret_from_files()
    audit_commands.retire_key_file(actor, keyfiles.DJANGO_SECRET, key_id)


@transaction.atomic
def revoke_token(actor: Actor, token: APIToken, *, by: User | None = None) -> bool:
    """Revoke ``token`` and every live token it issued, and theirs (each a ``token.revoked``
    event; a descendant's names the token whose revocation took it along in ``revoked_with``).
    False when ``token`` itself was already revoked (nothing recorded twice)."""
    if by is not None and by.pk != token.user_id:
        _require(by, "accounts.manage_all_tokens")
    return _revoke_family(actor, token)


def _revoke_family(actor: Actor, token: APIToken) -> bool:
    """``revoke_token`` without its permission check (the caller has made it)."""
    token = APIToken.objects.select_for_update().get(pk=token.pk)
    newly = token.revoked_at is None
    family = [token]
    frontier = [token.pk]
    while frontier:
        # Parents before children, each generation in key order: revocations lock alike.
        children = list(
            APIToken.objects.select_for_update()
            .select_related("user")
            .filter(parent_id__in=frontier)
            .order_by("pk")
        )
        family += children
        frontier = [child.pk for child in children]
    now = timezone.now()
    for member in family:
        if member.revoked_at is not None:
            continue
        member.revoked_at = now
        member.save(update_fields=["revoked_at"])
        data = {"token_id": member.key, "name": member.name, "username": member.user.username}
        if member.pk != token.pk:
            data["revoked_with"] = token.key
        store.append("token", member.key, "token.revoked", data, actor=actor)
    return newly


def record_token_rejected(actor: Actor, token: APIToken, reason: str) -> None:
    """Record a refused use of an existing token, at most once a minute per token and reason
    (an atomic add in the shared cache, so every web process agrees), so that a client retrying
    with a dead token, alternating reasons or not, cannot flood the log."""
    if not throttle.once_per(60, "token-rejected", token.key, reason):
        return
    try:
        store.append(
            "token",
            token.key,
            "auth.token_rejected",
            {"token_id": token.key, "username": token.user.username, "reason": reason},
            actor=actor,
        )
    except Exception:
        throttle.forget("token-rejected", token.key, reason)
        raise


# --- Login security ---------------------------------------------------------------------------


def is_locked(username: str, now: datetime | None = None) -> datetime | None:
    """The time the lock ends, if ``username`` is locked now."""
    state = LoginState.objects.filter(username=_normalize_username(username)).first()
    now = now or timezone.now()
    if state and state.locked_until and state.locked_until > now:
        return state.locked_until
    return None


def _clear_name_on_commit(username: str) -> None:
    # Once the lock is visible: an attempt that takes a slot after this sees it.
    name = _normalize_username(username)
    transaction.on_commit(lambda: throttle.clear_name(name))


def lock_ends(username: str) -> datetime | None:
    """When ``username``'s lock ends, if it is locked now: a real account's lock
    (``is_locked``), or the outside lock of a name that does not exist
    (``accounts.throttle.name_locked_until``). The login answer follows this, so it is the same
    for both."""
    return is_locked(username) or throttle.name_locked_until(_normalize_username(username))


@transaction.atomic
def record_login(actor: Actor, user: User) -> None:
    throttle.clear_name(_normalize_username(user.username))
    store.append("account", _normalize_username(user.username), "auth.logged_in", {}, actor=actor)


@transaction.atomic
def record_logout(actor: Actor, user: User) -> None:
    store.append("account", _normalize_username(user.username), "auth.logged_out", {}, actor=actor)


@transaction.atomic
def record_login_failure(actor: Actor, username: str, reason: str) -> datetime | None:
    """Record a failed login; returns the end of the username's lock, if it is locked now.

    Every failure counts against its source address (``accounts.throttle``). A failure for an
    existing username is an ``auth.login_failed`` event of that account, and locks it at the
    threshold. Failures for usernames that do not exist are not recorded one by one (random
    names would fill the log): the first from an address in a window is an
    ``auth.unknown_user_failed`` event of that address, and the window's counts go into the
    ``auth.login_throttled`` event when the address reaches the limit. An attempt refused
    because its address is throttled (``reason == "throttled"``) was never checked and is
    covered by that event: nothing more is recorded.

    Every username, real or made up, counts its checked failures by one rule
    (``accounts.throttle.note_name_failure``). An attempt refused because the username is locked
    (``reason == "locked"``) had its password never checked: it is recorded for a real account
    but counts as no failure, and never towards a lock.
    """
    if reason == "throttled":
        return None
    name = _normalize_username(username)
    source = actor.source_ip
    # Events of an address name what it is counted as (an IPv6 client's /64).
    source_key = throttle.source_key(source)
    known = User.objects.filter(username=username).exists() if username else False
    tally = throttle.note_failure(source, unknown_user=not known)
    if tally.refused_until is not None:
        try:
            store.append(
                "login_source",
                source_key or "(none)",
                "auth.login_throttled",
                {
                    "until": tally.refused_until.isoformat(),
                    "failures": tally.failures,
                    "unknown_user_failures": tally.unknown_user_failures,
                    "window_s": tally.window_s,
                },
                actor=actor if known else replace(actor, username=""),
            )
        except Exception:
            # No refusal that the log does not state: lift it (the next failure trips it again).
            throttle.lift(source)
            raise
    if not known:
        if tally.unknown_user_failures <= 1:
            # Not the name typed: an unknown "username" is often a password typed in the wrong box.
            data: dict[str, object] = {"reason": reason, "window_s": tally.window_s}
            if tally.previous_window_unknown_user_failures:
                data["previous_window_unknown_user_failures"] = (
                    tally.previous_window_unknown_user_failures
                )
            store.append(
                "login_source",
                source_key or "(none)",
                "auth.unknown_user_failed",
                data,
                actor=replace(actor, username=""),
            )
        # From the outside a made-up name locks as a real one does (no event: see above).
        if reason == "locked":
            return throttle.name_locked_until(name)
        return throttle.note_unknown_name_failure(name)
    store.append("account", name, "auth.login_failed", {"reason": reason}, actor=actor)
    if reason == "locked":
        # Refused without checking its password: not a failure of the account (the projection
        # does not count it either), so it neither locks nor re-locks it.
        return is_locked(name)
    # The same count and window as a made-up name's (accounts.throttle.note_name_failure).
    failures = throttle.note_name_failure(name)
    if failures < settings.SANDBOX_LOCKOUT_THRESHOLD:
        return None
    state = LoginState.objects.select_for_update().get(username=name)
    if state.locked_until is not None and state.locked_until > timezone.now():
        return None
    until = timezone.now() + timedelta(seconds=settings.SANDBOX_LOCKOUT_S)
    store.append(
        "account",
        name,
        "auth.locked_out",
        {"until": until.isoformat(), "failures": failures},
        actor=Actor.system(name="lockout"),
        causation_id=actor.request_id,
    )
    _clear_name_on_commit(name)
    return until


@transaction.atomic
def unlock(actor: Actor, username: str, *, by: User | None = None) -> bool:
    """Lift a username's lock (an ``auth.unlocked`` event); False, and nothing recorded, when it
    is not locked."""
    if by is not None:
        _require(by, "accounts.manage_users")
    name = _normalize_username(username)
    if is_locked(name) is None:
        return False
    store.append("account", name, "auth.unlocked", {}, actor=actor)
    throttle.clear_name(name)
    return True
