"""The one cache folder of the project: exports, prepared Triton backends, galleries, indexes.

``$ASCL_CACHE`` when set, else ``~/.cache/ascl``. Everything that caches derives its folder
from ``cache_dir()`` so that one variable (or ``--cache``) moves all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ASCL_CACHE"


def cache_dir(override: str | Path | None = None) -> Path:
    """``override`` when given, else ``$ASCL_CACHE``, else ``~/.cache/ascl`` (not created here)."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "ascl").expanduser()
