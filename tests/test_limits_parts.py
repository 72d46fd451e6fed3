"""The pure parts of the serving limits, without a server: inflating against a budget, the
front door's request checks, bounded logging, descriptor-sized connection caps, public metadata."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib

import pytest

from ascl.serving.collections.filters import FilterError, parse_where
from ascl.serving.collections.index import public_metadata
from ascl.serving.online.front_door import BoundedLog
from ascl.serving.online.http_body import BodyError, Inflater
from ascl.serving.online.limits import FD_RESERVE
from ascl.serving.online.request_checks import MAX_FILTER_ROWS, _flat, http_infer_problem


def inflate_all(encoding: str, data: bytes, budget: int, chunk: int = 4096) -> bytes:
    inflater = Inflater(encoding, budget)
    out = b"".join(inflater.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + inflater.finish()


@pytest.mark.parametrize("encoding,pack", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),  # RFC 9110's deflate: zlib-wrapped
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, which some clients send
])
def test_bodies_inflate_to_what_was_packed(encoding: str, pack: object) -> None:
    body = json.dumps({"inputs": [{"name": "x", "data": list(range(3000))}]}).encode()
    assert inflate_all(encoding, pack(body), budget=len(body)) == body  # type: ignore[operator]


def test_a_bomb_stops_at_the_budget_without_inflating_the_rest() -> None:
    bomb = gzip.compress(b"\0" * (64 * 2**20))  # 64 MiB of zeros in ~64 KiB
    inflater = Inflater("gzip", 2**20)
    with pytest.raises(BodyError) as refused:
        for i in range(0, len(bomb), 1024):
            inflater.feed(bomb[i:i + 1024])
    assert refused.value.status == 413 and refused.value.close
    assert inflater.inflated <= 2**20 + 1  # never more than one byte past the budget


def test_broken_streams_are_the_clients_fault() -> None:
    with pytest.raises(BodyError) as corrupt:
        inflate_all("gzip", b"not gzip at all", 1000)
    assert corrupt.value.status == 400
    with pytest.raises(BodyError) as cut:
        inflate_all("gzip", gzip.compress(b"x" * 10_000)[:-20], 100_000)
    assert cut.value.status == 400 and "ended" in cut.value.message


def test_json_at_any_depth_is_a_client_error() -> None:
    assert http_infer_problem(b"[" * 100_000 + b"]" * 100_000, None) is not None
    assert "nested too deeply" in str(http_infer_problem(b"[" * 100_000 + b"]" * 100_000, None))
    deep = b'{"inputs": [{"name": "where", "shape": [1], "data": ' + b"[" * 900 + b'"x"' + b"]" * 900 + b"}]}"
    assert http_infer_problem(deep, None) is None  # deep but parseable: checked, then left to the model
    assert len(_flat([[i] for i in range(10 * MAX_FILTER_ROWS)])) == MAX_FILTER_ROWS + 1  # bounded work
    with pytest.raises(FilterError, match="nested"):
        parse_where('{"label": ' + "[" * 5000 + '"1"' + "]" * 5000 + "}")


def test_bounded_log_says_how_many_it_dropped() -> None:
    lines: list[str] = []
    log = BoundedLog(lines.append, every_s=3600)
    for i in range(1000):
        log("accept", f"accept failed {i}")
    log("other", "another kind")
    assert lines == ["accept failed 0", "another kind"]
    log.every_s = 0
    log("accept", "accept failed again")
    assert lines[-1] == "accept failed again (999 more like this in the last 0 s)"


def test_connection_caps_fit_the_descriptor_limit() -> None:
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400)); "
            "from ascl.serving.online.limits import Limits; "
            "print(Limits(max_connections=1024).within_descriptors().max_connections, "
            "Limits(max_connections=10).within_descriptors().max_connections)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str((400 - FD_RESERVE) // 2), "10"]
    raised = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (300, 5000)); "
              "from ascl.serving.online.limits import Limits; "
              "print(Limits(max_connections=1024).within_descriptors().max_connections, "
              "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", raised], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1024", str(2 * 1024 + FD_RESERVE)]  # the soft limit raised toward the hard one


def test_public_metadata_has_no_server_path() -> None:
    record = {"id": 3, "source": "/srv/data/photos", "path": "cats/1.jpg", "label": "cat"}
    assert public_metadata(record) == {"id": 3, "source": "photos", "path": "cats/1.jpg", "label": "cat"}
    assert public_metadata({"source": "/srv/list.txt", "path": "/srv/images/a.png"}) == {
        "source": "list.txt", "path": "a.png"}
    assert public_metadata({"source": "digits", "path": "3/0001.png"}) == {"source": "digits", "path": "3/0001.png"}
    assert record["source"] == "/srv/data/photos"  # the stored record is left as it is
