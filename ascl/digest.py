"""Content hashes of files: what caches, model identities and export records are keyed by.

Stdlib only, so that any layer (and a command's start-up) can hash a file without importing
the model layer.
"""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (``hashlib`` ``algorithm``), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
