"""One request's failure as a Triton response, for the Python models (vendored into the repository).

Every model answers each request of a dynamic batch on its own: whatever goes wrong with one
request becomes that request's error response, and the others of the batch are answered
normally. Bad input (``ValueError``, ``ImageError``) is INVALID_ARGUMENT (HTTP 400); an index whose
server cannot be reached now (``ConnectionError``: ``IndexUnavailableError``) is UNAVAILABLE with
``INDEX_UNAVAILABLE`` (retry later; the supervisor does not restart Triton for it); anything
else is INTERNAL and its traceback goes to the server log. Messages pass through
``public_message`` (no server paths, no memory addresses).
"""

from __future__ import annotations

import traceback
from typing import Any

from ascl.errors import AsclError, public_message

INDEX_UNAVAILABLE = "the gallery index is unavailable; retry shortly"


class RequestError(AsclError, ValueError):
    """A request the client must change (empty, too large, inconsistent)."""


def error_response(pb_utils: Any, model: str, exc: BaseException) -> Any:
    """The ``InferenceResponse`` that reports ``exc`` for one request of ``model``."""
    invalid = isinstance(exc, ValueError)  # ImageError and RequestError are ValueErrors
    errors = pb_utils.TritonError
    if isinstance(exc, ConnectionError):
        pb_utils.Logger.log_warn(f"{model}: {exc}")
        code = getattr(errors, "UNAVAILABLE", None)
        message = f"{model}: {INDEX_UNAVAILABLE}"
        return pb_utils.InferenceResponse(error=errors(message) if code is None else errors(message, code))
    code = getattr(errors, "INVALID_ARG" if invalid else "INTERNAL", None)
    if not invalid:
        pb_utils.Logger.log_error(f"{model}: request failed: {''.join(traceback.format_exception(exc))}")
    message = public_message(f"{model}: {exc}" if invalid else f"{model}: internal error ({type(exc).__name__})")
    error = errors(message) if code is None else errors(message, code)
    return pb_utils.InferenceResponse(error=error)
