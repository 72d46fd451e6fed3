"""Metadata filters (``where={"label": "cat"}``): the grammar every index backend applies.

A filter maps field names to a value or a list of values: ``{"label": ["cat", "dog"], "source":
"/data"}`` keeps the entries whose ``label`` is cat OR dog AND whose ``source`` is /data. Values
compare as text: a stored number or boolean matches its JSON spelling (``3``, ``0.5``, ``true``);
an entry without the field (or with ``null``) never matches. A field that no entry of the index
has is an error that lists the known ones (``check_fields``); a filter that matches nothing
returns no hits. A filter's JSON text is at most ``MAX_FILTER_BYTES``: ``filter_size_problem`` is
the one rule and message (the client, the front door and every parse apply it).

How the FAISS index evaluates a filter: ``ascl.serving.collections.faiss_filters``.

Only the standard library and ``ascl.errors``: the Triton search model vendors this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ascl.errors import AsclError

MAX_FILTER_BYTES = 16 * 1024  # one filter as JSON text; larger ones are refused (filter_size_problem)
Where = Mapping[str, Any]  # field -> value or list of values (str, int, float, bool)
Parsed = dict[str, tuple[str, ...]]  # field -> accepted values as text (any of)


class FilterError(AsclError, ValueError):
    """A filter that cannot be applied (malformed, too large, an unknown field); the message says why."""


def filter_size_problem(size: int) -> str | None:
    """Why a filter of ``size`` bytes of JSON text is refused, or None when it is within the limit."""
    if size > MAX_FILTER_BYTES:
        return f"a filter of {size} bytes is over the {MAX_FILTER_BYTES // 1024} KiB limit"
    return None


def _check_size(text: str) -> None:
    problem = filter_size_problem(len(text.encode()))
    if problem:
        raise FilterError(problem)


def as_text(value: Any) -> str | None:
    """How a metadata value compares in a filter: text as is, numbers and booleans in JSON, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def parse_where(where: Where | str | bytes | None) -> Parsed:
    """A filter (a mapping, or its JSON text) as {field: (value, ...)}; {} means no filter.

    Raises FilterError for anything but an object of field -> value / list of values.
    """
    if where is None:
        return {}
    if isinstance(where, bytes | bytearray | str):
        text = where.decode("utf-8", errors="replace") if isinstance(where, bytes | bytearray) else where
        _check_size(text)
        if not text.strip():
            return {}
        try:
            where = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FilterError(f"a filter must be a JSON object of field -> value(s): {exc.msg}") from None
    if not isinstance(where, Mapping):
        raise FilterError(f"a filter must be an object of field -> value(s), got {type(where).__name__}")
    parsed: Parsed = {}
    for field, value in where.items():
        if not isinstance(field, str) or not field:
            raise FilterError(f"filter field names must be non-empty text, got {field!r}")
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        texts = [as_text(v) for v in values]
        if any(t is None for t in texts):
            raise FilterError(f"filter field {field!r}: values must be text, numbers or booleans (or a list of "
                              f"them), got {value!r}"[:300])
        parsed[field] = tuple(sorted({t for t in texts if t is not None}))
    return parsed


def where_json(where: Where | str | bytes | None) -> str:
    """The canonical JSON text of a filter (what a client sends); '' for no filter."""
    parsed = parse_where(where)
    if not parsed:
        return ""
    text = json.dumps({f: list(v) if len(v) != 1 else v[0] for f, v in sorted(parsed.items())},
                      separators=(",", ":"), ensure_ascii=False)
    _check_size(text)
    return text


def check_fields(parsed: Parsed, known: Iterable[str]) -> None:
    """FilterError naming the fields of ``parsed`` that no entry has, and the ones they have."""
    fields = sorted(set(known))
    unknown = sorted(set(parsed) - set(fields))
    if unknown:
        raise FilterError(f"unknown filter field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(u) for u in unknown)}; this index knows: {', '.join(fields)}")
