"""Rotate a control-plane key: ``rotate_key token-pepper|digest-key|django-secret``.

A new key with the next key id becomes current; the old one stays accepted until it is retired
(``retire_key``), so nothing that exists breaks: tokens hashed with the old pepper (re-hashed at
their next use), digests signed with the old key (Ed25519: its public half is kept for good), and
sessions and signed links made under the old Django secret (a fallback until retired). Each
rotation is a ``key.rotated`` event naming the key ids, never the keys. Token peppers, the Django
secret and HMAC digest keys take effect when the processes restart; an Ed25519 digest key at the
next digest. See docs/security.md, "Key rotation".
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts import commands
from audit import commands as audit_commands
from audit.actor import Actor

KINDS = ("token-pepper", "digest-key", "django-secret")


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("kind", choices=KINDS)

    def handle(self, *args: Any, **options: Any) -> None:
        kind = options["kind"]
        actor = Actor.system(channel="shell", name="rotate_key")
        rotate = {
            "token-pepper": commands.rotate_token_pepper,
            "digest-key": audit_commands.rotate_digest_key,
            "django-secret": commands.rotate_django_secret,
        }[kind]
        try:
            previous, new = rotate(actor)
        except audit_commands.KeyRotationRefused as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"rotated {kind}: {previous} -> {new}")
        if kind != "digest-key" or new.startswith("hmac-"):
            self.stdout.write(
                f"restart the web and worker processes to make {new} current; {previous} "
                f"stays accepted until `manage.py retire_key {kind} {previous}`"
            )
