"""Versioned control-plane secrets kept as files: token peppers, the Django secret, HMAC keys.

Each kind of secret is a set of versions (1, 2, ...) in ``$SANDBOX_DATA_DIR/secrets/``, one file
per version, named ``<stem><version>`` (``token_pepper_v2``, ``django_secret_key_v2``,
``digest_hmac_2``); the first version may keep the name it had before versions existed
(``django_secret_key``). The newest version is the current one; the others are still accepted
(an old token, a session signed before the rotation) until they are *retired*, which deletes
their file. A version given in the environment overrides its file and cannot be retired here.

Settings read these once (``sandbox_site.settings``): a rotation takes effect in a process when it
restarts. ``manage.py rotate_key`` and ``retire_key`` write and delete the files and record both
(docs/security.md, "Key rotation"). Only the standard library: settings import this module.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DJANGO_SECRET",
    "DIGEST_HMAC",
    "TOKEN_PEPPER",
    "Kind",
    "create_next",
    "current_and_older",
    "ensure",
    "env_versions",
    "load",
    "remove",
]


@dataclass(frozen=True, slots=True)
class Kind:
    """Where one kind of versioned secret lives, and how its versions are named."""

    name: str  # the kind as commands and events name it
    stem: str  # file ``<stem><version>``
    key_id_prefix: str  # key id ``<prefix><version>``
    legacy_v1: str = ""  # the file that held version 1 before versions existed
    env_prefix: str = ""  # ``<env_prefix><version>`` in the environment overrides the file
    env_v1: str = ""  # an older variable that gives version 1

    def key_id(self, version: int) -> str:
        return f"{self.key_id_prefix}{version}"

    def version_of(self, key_id: str) -> int | None:
        """The version a key id names (``v2`` -> 2), None for anything else."""
        match = re.fullmatch(re.escape(self.key_id_prefix) + r"([1-9][0-9]{0,4})", key_id)
        return int(match.group(1)) if match else None

    def path(self, directory: Path, version: int) -> Path:
        if version == 1 and self.legacy_v1 and (directory / self.legacy_v1).exists():
            return directory / self.legacy_v1
        return directory / f"{self.stem}{version}"


TOKEN_PEPPER = Kind("token-pepper", "token_pepper_v", "v", env_prefix="SANDBOX_TOKEN_PEPPER_V")
DJANGO_SECRET = Kind("django-secret", "django_secret_key_v", "v", legacy_v1="django_secret_key")
DIGEST_HMAC = Kind("digest-key", "digest_hmac_", "hmac-", env_v1="SANDBOX_DIGEST_HMAC_KEY")


def _file_versions(kind: Kind, directory: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if not directory.is_dir():
        return found
    pattern = re.compile(re.escape(kind.stem) + r"([1-9][0-9]{0,4})")
    for path in directory.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    if kind.legacy_v1 and (directory / kind.legacy_v1).is_file():
        found.setdefault(1, directory / kind.legacy_v1)
    return found


def env_versions(kind: Kind, environ: Mapping[str, str]) -> dict[int, str]:
    """The versions this environment gives (each overrides its file)."""
    found: dict[int, str] = {}
    if kind.env_v1 and environ.get(kind.env_v1):
        found[1] = environ[kind.env_v1]
    if kind.env_prefix:
        pattern = re.compile(re.escape(kind.env_prefix) + r"([1-9][0-9]{0,4})")
        for name, value in environ.items():
            match = pattern.fullmatch(name)
            if match and value:
                found[int(match.group(1))] = value
    return found


def load(kind: Kind, directory: Path, environ: Mapping[str, str]) -> dict[int, str]:
    """Every version of ``kind``: its files, overridden by the environment; version 1 is
    generated (once, race-free) when there is none at all."""
    versions = {v: p.read_text().strip() for v, p in _file_versions(kind, directory).items()}
    versions.update(env_versions(kind, environ))
    if not versions:
        name = kind.legacy_v1 or f"{kind.stem}1"
        versions[1] = _create(directory / name)
    empty = sorted(v for v, value in versions.items() if not value)
    if empty:
        raise ValueError(f"{kind.name}: version(s) {empty} are empty")
    return versions


def current_and_older(versions: Mapping[int, str]) -> tuple[str, list[str]]:
    """The newest version's value, and the older ones' newest first (SECRET_KEY_FALLBACKS)."""
    ordered = sorted(versions, reverse=True)
    return versions[ordered[0]], [versions[v] for v in ordered[1:]]


def _create(path: Path, nbytes: int = 48) -> str:
    """Write a new random secret at ``path`` (0600) unless one is there; return what is there."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


def ensure(path: Path, nbytes: int = 48) -> str:
    """A secret of one version only (the secrets store's generated default key, its audit HMAC
    key): the one at ``path``, generated there (0600, race-free) when there is none."""
    return _create(path, nbytes)


def create_next(kind: Kind, directory: Path, environ: Mapping[str, str]) -> int:
    """Generate the version after the newest one (file or environment); return its number.

    Refuses (FileExistsError) when another rotation made that version meanwhile.
    """
    known = set(_file_versions(kind, directory)) | set(env_versions(kind, environ))
    version = max(known, default=0) + 1
    path = directory / f"{kind.stem}{version}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48))
    return version


def remove(kind: Kind, directory: Path, version: int) -> Path:
    """Delete the file of ``version`` (FileNotFoundError when it has none)."""
    path = _file_versions(kind, directory).get(version)
    if path is None:
        raise FileNotFoundError(f"{kind.name} {kind.key_id(version)} has no file in {directory}")
    path.unlink()
    return path
