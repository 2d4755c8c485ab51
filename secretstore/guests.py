"""Secrets given to guests: which ones a request names, their values, and the masker for them.

A request (a VM at create, or one exec) names secrets as ``{"name": ..., "env": "VAR"}`` or
``{"name": ..., "file": "/abs/path"}`` (``"group"`` picks a group's secret when the caller has one
of that name too). They are resolved against what the user owns (its own, then its groups'),
decrypted here and nowhere else, and travel to the guest over the agent channel only (the VM
domain does that). What is recorded about them is ``Given.record()``: name, owner, version and
HMAC, never the value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError

from accounts.caller import Caller
from secretstore import commands, crypto, policy
from secretstore.masking import Masker
from secretstore.models import Secret

__all__ = [
    "MAX_REFS",
    "Given",
    "masker_for",
    "masker_for_records",
    "resolve",
    "resolve_records",
    "validate_refs",
]

MAX_REFS = 64
USE = "secretstore.use_secret"


@dataclass(frozen=True)
class Given:
    name: str
    owner: str
    version: int
    hmac: str
    value: bytes
    env: str | None = None
    file: str | None = None

    def record(self) -> dict[str, Any]:
        """What an event or a read model may say about it."""
        where = {"env": self.env} if self.env else {"file": self.file}
        return {"name": self.name, "owner": self.owner, "version": self.version,
                "hmac": self.hmac, **where}  # fmt: skip


def _bad(message: str) -> ValidationError:
    return ValidationError({"secrets": message})


def validate_refs(refs: Any) -> list[dict[str, str]]:
    """The references of a request, checked for shape (not yet for existence)."""
    if refs in (None, ""):
        return []
    if not isinstance(refs, list) or len(refs) > MAX_REFS:
        raise _bad(f"a list of at most {MAX_REFS} references")
    clean: list[dict[str, str]] = []
    envs: set[str] = set()
    files: set[str] = set()
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or set(ref) - {"name", "env", "file", "group"}:
            raise _bad(f"[{i}]: an object with name, and env or file (and group)")
        name = ref.get("name")
        if not isinstance(name, str) or not commands.NAME_PATTERN.fullmatch(name):
            raise _bad(f"[{i}]: name must be a secret's name")
        out = {"name": name}
        group = ref.get("group")
        if group is not None:
            if not isinstance(group, str) or not 0 < len(group) <= 150:
                raise _bad(f"[{i}]: group must be a group's name")
            out["group"] = group
        env, file = ref.get("env"), ref.get("file")
        if (env is None) == (file is None):
            raise _bad(f"[{i}]: give env (a variable) or file (a path), one of them")
        if env is not None:
            if not isinstance(env, str) or not commands.NAME_PATTERN.fullmatch(env):
                raise _bad(f"[{i}]: env must be a variable name")
            if env in envs:
                raise _bad(f"[{i}]: the variable {env} is given twice")
            envs.add(env)
            out["env"] = env
        else:
            if (
                not isinstance(file, str)
                or not file.startswith("/")
                or file.endswith("/")
                or "\x00" in file
                or len(file) > 4096
                or any(part in (".", "..") for part in file.split("/"))
            ):
                raise _bad(f"[{i}]: file must be an absolute path to a file in the guest")
            if file in files:
                raise _bad(f"[{i}]: the file {file} is given twice")
            files.add(file)
            out["file"] = file
        clean.append(out)
    return clean


def _find(user: Any, ref: dict[str, str]) -> Secret | None:
    qs = policy.usable_by_user(user).filter(name=ref["name"])
    if "group" in ref:
        return qs.filter(owner_group__name=ref["group"]).first()
    own = qs.filter(owner_user_id=user.pk).first()
    if own is not None:
        return own
    groups = list(qs.filter(owner_group__isnull=False)[:2])
    if len(groups) > 1:
        raise _bad(f"{ref['name']}: several of your groups have it; say which with group")
    return groups[0] if groups else None


def resolve(
    user: Any, refs: Iterable[dict[str, str]], *, strict: bool = True, caller: Caller | None = None
) -> list[Given]:
    """The secrets ``refs`` name, as ``user`` may use them, decrypted.

    ``caller`` (a request's) must hold ``secretstore.use_secret`` (a token: in its scopes).
    ``strict``: a missing or unreadable secret is a ValidationError; otherwise it is left out
    (a VM's secret deleted after the VM was made)."""
    refs = list(refs)
    if refs and caller is not None and not caller.has(USE):
        raise PermissionDenied(f"you need the {USE} permission to give secrets to a guest")
    given: list[Given] = []
    for ref in refs:
        secret = _find(user, ref)
        if secret is None:
            if strict:
                raise _bad(f"{ref['name']}: no such secret of yours or your groups")
            continue
        try:
            value = commands.open_value(secret)
        except (crypto.UnknownKey, crypto.DecryptionFailed) as exc:
            if strict:
                raise _bad(f"{ref['name']}: its value cannot be read ({exc})") from exc
            continue
        given.append(
            Given(
                secret.name,
                secret.owner_label,
                secret.version,
                secret.fingerprint,
                value,
                env=ref.get("env"),
                file=ref.get("file"),
            )
        )
    return given


def masker_for(given: Iterable[Given]) -> Masker:
    return Masker((g.name, g.value) for g in given)


def _ref_of(user: Any, record: dict[str, Any]) -> dict[str, str] | None:
    """A recorded secret (name, owner, env or file) as a reference ``user`` would make."""
    owner = str(record.get("owner", ""))
    kind, _, who = owner.partition(":")
    ref = {"name": record["name"]}
    for key in ("env", "file"):
        if record.get(key):
            ref[key] = record[key]
    if kind == "group":
        ref["group"] = who
    elif who != getattr(user, "username", None):
        return None  # another user's: never given on this user's behalf
    return ref


def resolve_records(user: Any, records: Iterable[dict[str, Any]]) -> list[Given]:
    """The secrets a VM of ``user`` was given at create (its ``secrets``), as ``user`` may
    still use them now; one deleted since, or no longer ``user``'s to use, is left out."""
    refs = [r for r in (_ref_of(user, rec) for rec in records) if r is not None]
    return resolve(user, refs, strict=False)


def masker_for_records(records: Iterable[dict[str, Any]], extra: Iterable[Given] = ()) -> Masker:
    """The masker for what a guest was given (``VirtualMachine.secrets_seen``: name and owner),
    whoever may use them now: what it was given may come out of it still."""
    pairs: list[tuple[str, bytes]] = [(g.name, g.value) for g in extra]
    for record in records:
        kind, _, who = str(record.get("owner", "")).partition(":")
        qs = Secret.objects.filter(name=record.get("name", ""))
        qs = (
            qs.filter(owner_group__name=who)
            if kind == "group"
            else qs.filter(owner_user__username=who)
        )
        secret = qs.first()
        if secret is None:
            continue
        try:
            pairs.append((secret.name, commands.open_value(secret)))
        except (crypto.UnknownKey, crypto.DecryptionFailed):
            continue
    return Masker(pairs)
