"""The project's one error base, its exit-code policy, and error text safe to show a remote client.

Every error a user can act on derives from ``AsclError``: its message says what was wrong and
what to do, and ``exit_code`` is what the ``ascl`` command returns for it (handled once, in
``ascl.cli.main``). The policy: ``USAGE`` (2) for bad input (an argument, a file, a config, an
image), ``FAILURE`` (1) for an operation that could not be done with good input (a server that
would not start, an export that missed its tolerance). Subclasses keep a builtin base too
(``ValueError``, ``LookupError``, ...) so callers that catch those keep working.

Messages that reach a client of the server name what was wrong with the request; they never
carry this machine's file paths or Python object reprs with memory addresses (which tell an
attacker where things live). The full error stays in the server log.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

USAGE = 2  # bad input: the user fixes an argument, a file or a config
FAILURE = 1  # good input, but the operation failed (server, export tolerance, upload)


class AsclError(Exception):
    """Base of every error meant for a user: a message that says what to do, and an exit code."""

    exit_code: int = USAGE

    @property
    def message(self) -> str:
        """The user-facing text (what ``ascl`` prints after ``error:``)."""
        return str(self.args[0]) if len(self.args) == 1 else str(self)


class InputError(AsclError):
    """Bad input met in a library that raises builtin errors (a file PIL cannot read, ...)."""


class OperationError(AsclError):
    """Good input, but the operation failed (a server, a remote service, the disk)."""

    exit_code = FAILURE


@contextmanager
def user_errors(*types: type[BaseException], into: type[AsclError] = InputError, prefix: str = "") -> Iterator[None]:
    """Re-raise builtin exceptions of ``types`` (from libraries) as ``into``, so the CLI reports them.

    ``AsclError`` passes through unchanged; anything else keeps its traceback (a bug).
    """
    try:
        yield
    except AsclError:
        raise
    except types as exc:
        raise into(f"{prefix}{exc}") from exc

_OBJECT_REPR = re.compile(r"<([A-Za-z_][\w.]*) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"<>:,;()]+/)+([^\s/'\"<>:,;()]+)")


def public_message(text: str, limit: int = 500) -> str:
    """``text`` without object reprs, memory addresses or absolute paths (a path keeps its file name)."""
    text = _OBJECT_REPR.sub(r"<\1>", text)
    text = _ADDRESS.sub("0x...", text)
    text = _ABSOLUTE_PATH.sub(r"\1", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
