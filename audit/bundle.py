"""Evidence bundles: a range of the log, the digests that sign it and the keys, in one zip.

The range is widened to whole signed digests (CloudTrail's digest files work the same way):
the first event's link must equal a digest's ``start_prev_hash`` and the last event's hash a
digest's ``end_hash``, so that every exported line is proven by a signature. The caller signs a
digest over the pending tail first, so the newest events are covered too.

Contents (see docs/audit-exports.md):

- ``events.jsonl``: one event per line, exactly the stored columns, ``data`` as its stored
  canonical JSON text and ``recorded_at`` as hashed, so ``audit.hashing.event_hash`` recomputes;
- ``digests.json``: the digests covering the range, each with its signed document;
- ``keys.json``: the Ed25519 public keys (with fingerprints) known to the server;
- ``README.txt``: how to verify;
- ``manifest.json``: what the bundle holds, with the SHA-256 and size of every file above;
- ``manifest.sig``: an Ed25519 signature of ``manifest.json``.

``python -m audit.offline verify bundle.zip`` checks all of it without the database.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from django.conf import settings

from audit import keys, offline, retention, signing
from audit.hashing import canonical_json, format_time
from audit.models import Digest, Event
from audit.store import RecordedEvent, iter_events

__all__ = [
    "Attachment",
    "BundleInfo",
    "NotCovered",
    "aligned_range",
    "attachment_path",
    "register_attachment",
    "write_bundle",
]

Progress = Callable[[int], None]

README = """Evidence bundle of the MicroVM Sandbox audit log.

Verify it, offline, with the project's package installed (no database, no server):

    python -m audit.offline verify {name}

Pin the signing keys you obtained independently (GET /api/v1/audit/keys/, or an earlier
bundle) so that a bundle re-signed by someone else is refused:

    python -m audit.offline verify {name} --trust <fingerprint>

The verifier recomputes the SHA-256 chain hash of every line of events.jsonl from its content
and the previous line's hash (audit/hashing.py, event_hash), checks that positions follow each
other, that each signed digest's signature is valid and its end hash equals the hash of the
event at its end position, and that the digests cover exactly the exported range. Any changed,
removed, inserted or reordered line is reported with its line number and position.

Keys in this bundle (SHA-256 fingerprints of the raw Ed25519 public keys):
{keys}
"""


class NotCovered(Exception):
    """No signed digest covers part of the requested range (sign one first)."""


@dataclass(frozen=True)
class BundleInfo:
    first_position: int
    last_position: int
    events: int
    digests: int


def aligned_range(first: int, last: int) -> tuple[int, int, list[Digest]]:
    """The digests overlapping [first, last] and the range they cover exactly."""
    digests = list(
        Digest.objects.filter(end_position__gte=first, start_position__lte=last).order_by(
            # An idle digest (no events) starts where the next busy one does.
            "start_position",
            "end_position",
            "sequence",
        )
    )
    if not digests or digests[-1].end_position < last or digests[0].start_position > first:
        covered = f"{digests[0].start_position}..{digests[-1].end_position}" if digests else "none"
        raise NotCovered(f"positions {first}..{last} are not all signed (digests cover {covered})")
    return digests[0].start_position, digests[-1].end_position, digests


class _HashingWriter:
    """Write-through to a zip member while hashing and counting what was written."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.fh.write(data)


def _digest_entry(d: Digest) -> dict[str, Any]:
    return {
        "id": d.pk,
        "start_position": d.start_position,
        "end_position": d.end_position,
        "event_count": d.event_count,
        "start_prev_hash": d.start_prev_hash,
        "end_hash": d.end_hash,
        "algorithm": d.algorithm,
        "key_id": d.key_id,
        "document": d.document,
        "signature": d.signature,
        "created_at": format_time(d.created_at),
    }


@dataclass(frozen=True)
class Attachment:
    """The file an event type references by SHA-256 and size: ``resolve(data)`` says where it
    is on this server (None: not resolvable, e.g. a path outside its directory); it travels in
    the bundle as ``attachments/<position><suffix>`` (the suffix may depend on the data)."""

    event_type: str
    resolve: Callable[[dict[str, Any]], Path | None]
    suffix: Callable[[dict[str, Any]], str]


def _export_file(data: dict[str, Any]) -> Path | None:
    job, fmt = str(data.get("job", "")), str(data.get("format", ""))
    if not job.replace("-", "").isalnum() or not fmt.isalnum():
        return None
    return Path(settings.SANDBOX_AUDIT_EXPORT_DIR) / f"{job}.{fmt}"


# Events that reference a file by SHA-256: the file travels in the bundle beside them. Audit's
# own exports are here; an app above registers its own (``register_attachment``) while the apps
# load.
_ATTACHMENTS: dict[str, Attachment] = {
    "audit.exported": Attachment(
        "audit.exported", _export_file, lambda d: f".{d.get('format', 'bin')}"
    ),
}


def register_attachment(attachment: Attachment) -> None:
    """Add an event type whose file travels in bundles (from an app's ``AppConfig.ready``).
    Registering the same again does nothing; another definition for a known type is a
    programming error (RuntimeError)."""
    known = _ATTACHMENTS.get(attachment.event_type)
    if known is not None and known != attachment:
        raise RuntimeError(f"attachment of {attachment.event_type} is already registered")
    _ATTACHMENTS[attachment.event_type] = attachment


def attachment_path(event_type: str, data: dict[str, Any]) -> Path | None:
    """Where the file an event references lives on this server (None: not resolvable)."""
    attachment = _ATTACHMENTS.get(event_type)
    return attachment.resolve(data) if attachment is not None else None


def _attach(
    zf: zipfile.ZipFile, files: dict[str, Any], e: RecordedEvent, data: dict[str, Any]
) -> dict[str, Any]:
    """Copy the file ``e`` references into ``attachments/`` when it matches the event's
    SHA-256 and size; say why otherwise. The manifest lists it with its SHA-256, so the
    offline verifier checks it like every other file, and the event (in the chain) names the
    same SHA-256."""
    entry: dict[str, Any] = {
        "position": e.position,
        "event_id": e.event_id,
        "type": e.type,
        "sha256": data.get("sha256"),
        "size": data.get("size"),
        "file": None,  # the member name when included
        "note": None,  # why not included, or that the file does not match its event
    }
    path = attachment_path(e.type, data)
    if path is None or not path.is_file():
        entry["note"] = "not included: the file is not on this server"
        return entry
    if e.type == "audit.exported" and data.get("format") == "zip":
        # Bundles are not nested in bundles (each archive would hold every earlier one): the
        # event names the zip's SHA-256 and the server keeps the file write-once.
        entry["note"] = "not included: a bundle is referenced by its SHA-256 only"
        return entry
    name = f"attachments/{e.position}{_ATTACHMENTS[e.type].suffix(data)}"
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src, zf.open(name, "w", force_zip64=True) as member:
        while block := src.read(1 << 20):
            digest.update(block)
            size += len(block)
            member.write(block)
    files[name] = {"sha256": digest.hexdigest(), "size": size}
    entry["file"] = name
    if (digest.hexdigest(), size) != (data.get("sha256"), data.get("size")):
        entry["note"] = "included, but the file does NOT match its event (altered or truncated)"
    return entry


def write_bundle(
    fh: IO[bytes],
    *,
    first: int,
    last: int,
    kind: str = "bundle",
    requested: dict[str, Any] | None = None,
    created_by: str = "",
    name: str = "bundle.zip",
    progress: Progress | None = None,
    attachments: bool = True,
) -> BundleInfo:
    """Write the bundle of positions [first, last], widened to whole digests, into ``fh``."""
    start, end, digests = aligned_range(first, last)
    oldest = Event.objects.order_by("position").values_list("recorded_at", flat=True).first()
    files: dict[str, dict[str, Any]] = {}
    key_infos = keys.public_key_infos()
    manifest_key_id, manifest_key = keys.current_key()
    keys.register(manifest_key_id, manifest_key.public_key())
    if manifest_key_id not in {k.key_id for k in key_infos}:
        key_infos = keys.public_key_infos()

    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        count = 0
        end_hash = ""
        wanted: list[tuple[Any, dict[str, Any]]] = []
        with zf.open(offline.EVENTS_FILE, "w", force_zip64=True) as member:
            out = _HashingWriter(member)
            for batch in iter_events(start - 1, until=end, batch=5000):
                lines = []
                for e in batch:
                    if attachments and e.type in _ATTACHMENTS:
                        wanted.append((e, e.data))
                    fields = e.hashed_fields()
                    fields["recorded_at"] = format_time(e.recorded_at)
                    lines.append(canonical_json(fields))
                    end_hash = e.hash
                out.write(("\n".join(lines) + "\n").encode())
                count += len(batch)
                if progress is not None:
                    progress(count)
        files[offline.EVENTS_FILE] = {"sha256": out.sha.hexdigest(), "size": out.size}
        if count != end - start + 1:
            raise RuntimeError(
                f"expected {end - start + 1} events in {start}..{end}, read {count}: "
                "the log has gaps; run verify_audit_chain"
            )

        def add(member_name: str, data: bytes) -> None:
            zf.writestr(member_name, data)
            files[member_name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

        attached = [_attach(zf, files, e, data) for e, data in wanted]

        add(
            offline.DIGESTS_FILE,
            (canonical_json([_digest_entry(d) for d in digests]) + "\n").encode(),
        )
        add(
            offline.KEYS_FILE,
            (
                canonical_json(
                    {
                        # The key history with its signed statements, oldest first: what
                        # the offline verifier needs to tell a rotated key from a forged one.
                        "keys": [k.history_entry() for k in key_infos]
                    }
                )
                + "\n"
            ).encode(),
        )
        add(
            "README.txt",
            README.format(
                name=name,
                keys="\n".join(f"  {k.key_id}: {k.fingerprint}" for k in key_infos) or "  none",
            ).encode(),
        )
        manifest = {
            "format": offline.BUNDLE_FORMAT,
            "format_version": offline.FORMAT_VERSION,
            "kind": kind,
            "created_at": format_time(datetime.now(UTC)),
            "created_by": created_by,
            "requested": requested or {},
            "range": {
                "first_position": start,
                "last_position": end,
                "event_count": count,
                "start_prev_hash": digests[0].start_prev_hash,
                "end_hash": end_hash,
            },
            "digests": {
                "count": len(digests),
                "algorithms": sorted({d.algorithm for d in digests}),
                "key_ids": sorted({d.key_id for d in digests}),
            },
            "retention": retention.summary(oldest_event_at=oldest),
            "attachments": attached,
            "files": files,
        }
        manifest_bytes = (canonical_json(manifest) + "\n").encode()
        zf.writestr(offline.MANIFEST_FILE, manifest_bytes)
        zf.writestr(
            offline.MANIFEST_SIG_FILE,
            canonical_json(
                {
                    "algorithm": signing.ED25519,
                    "key_id": manifest_key_id,
                    "signature": signing.sign(manifest_key, manifest_bytes),
                }
            )
            + "\n",
        )
    return BundleInfo(start, end, count, len(digests))
