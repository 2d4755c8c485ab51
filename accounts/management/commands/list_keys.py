"""List the control-plane keys by kind: key ids, which is current, where each comes from, and
what still depends on each (live tokens per pepper, digests per digest key). Never a key's
value. Read this before ``retire_key``: a pepper that live tokens still use stops them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from accounts import commands
from audit import keys
from audit.models import Digest
from core import keyfiles


class Command(BaseCommand):
    help = __doc__

    def _versions(self, kind: keyfiles.Kind) -> list[tuple[int, str]]:
        directory = Path(settings.SANDBOX_SECRETS_DIR)
        from_env = keyfiles.env_versions(kind, os.environ)
        versions = keyfiles.load(kind, directory, os.environ)
        return [(v, "environment" if v in from_env else "file") for v in sorted(versions)]

    def handle(self, *args: Any, **options: Any) -> None:
        out = self.stdout.write
        peppers = self._versions(keyfiles.TOKEN_PEPPER)
        out("token-pepper")
        for version, source in peppers:
            current = " (current)" if version == peppers[-1][0] else ""
            live = commands.live_tokens_on_pepper(version)
            out(f"  v{version}{current}: {source}, {live} live tokens")
        out("django-secret")
        if os.environ.get("DJANGO_SECRET_KEY"):
            fallbacks = len(settings.SECRET_KEY_FALLBACKS)
            out(f"  DJANGO_SECRET_KEY (current), {fallbacks} in DJANGO_SECRET_KEY_FALLBACKS")
        else:
            secrets = self._versions(keyfiles.DJANGO_SECRET)
            for version, source in secrets:
                current = " (current)" if version == secrets[-1][0] else " (fallback)"
                out(f"  v{version}{current}: {source}")
        out(f"digest-key (signing with {settings.SANDBOX_DIGEST_ALGORITHM})")
        signed = {
            key_id: Digest.objects.filter(key_id=key_id).count()
            for key_id in Digest.objects.values_list("key_id", flat=True).distinct()
        }
        for info in keys.public_key_infos():
            state = "private and public" if info.can_sign else "public only (retired)"
            current = " (current)" if info.current else ""
            out(
                f"  {info.key_id}{current}: {state}, fingerprint {info.fingerprint}, "
                f"{signed.get(info.key_id, 0)} digests"
            )
        hmac = self._versions(keyfiles.DIGEST_HMAC)
        for version, source in hmac:
            key_id = keyfiles.DIGEST_HMAC.key_id(version)
            current = " (current)" if version == hmac[-1][0] else ""
            out(f"  {key_id}{current}: {source}, {signed.get(key_id, 0)} digests")
