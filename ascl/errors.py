"""Error text that is safe to show a remote client.

Messages that reach a client of the server name what was wrong with the request; they never
carry this machine's file paths or Python object reprs with memory addresses (which tell an
attacker where things live). The full error stays in the server log.
"""

from __future__ import annotations

import re

_OBJECT_REPR = re.compile(r"<([A-Za-z_][\w.]*) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"<>:,;()]+/)+([^\s/'\"<>:,;()]+)")


def public_message(text: str, limit: int = 500) -> str:
    """``text`` without object reprs, memory addresses or absolute paths (a path keeps its file name)."""
    text = _OBJECT_REPR.sub(r"<\1>", text)
    text = _ADDRESS.sub("0x...", text)
    text = _ABSOLUTE_PATH.sub(r"\1", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
