"""A stage manifest's hash of its own fields.

The files' sha256 does not cover what a manifest itself says (rows, counts, figures, wall seconds), which reports and
the cost ledger read: a hash of the manifest's own fields, written with it, does, so a hand edit of the manifest makes
the output damaged like an edit of its files (manifests written before the field existed are not checked for it).
Its own module: both kdflow/store/outputs.py (which writes and checks it) and kdflow/store/remote.py (which outputs
imports, and which must not take a remote copy with an edited manifest as whole) read it.
"""

from __future__ import annotations

import hashlib
import json

SELF_SHA256 = "manifest_sha256"


def manifest_sha256(manifest: dict) -> str:
    fields = {k: v for k, v in manifest.items() if k != SELF_SHA256}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def edited(manifest: dict) -> bool:
    """Whether ``manifest`` records its own hash and its fields no longer match it."""
    return SELF_SHA256 in manifest and manifest_sha256(manifest) != manifest[SELF_SHA256]
