"""Weights reach the Hub the way the Hub takes them: through git LFS (``tests/hub_endpoint.py``).

The real Hub answers ``preupload`` with ``"lfs"`` for every path its ``.gitattributes`` marks
``filter=lfs`` (``*.safetensors`` among them) and for every file above 10 MiB; the client then
asks the LFS batch API where to PUT each object, PUTs it, and commits ``lfsFile`` entries that
name the objects by sha256 and size. Here ``ascl push`` and ``huggingface_hub`` run against the
stand-in in a fresh process (``HF_ENDPOINT`` is read at import time), with Xet off because the
stand-in serves the LFS transfer only; the protocol checks run in-process over plain HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from ascl.encoder import Encoder

sys.path.insert(0, str(Path(__file__).parent))
from hub_endpoint import HubStandIn, git_blob_sha1, lfs_pointer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import hashlib, json, sys
from pathlib import Path
import torch
from huggingface_hub import (CommitOperationAdd, HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                             snapshot_download)
from ascl.cli import main
from ascl.encoder import Encoder

args = json.loads(sys.argv[1])
out = {}
out["push_rc"] = main(["push", args["src"], "--repo-id", "org/lfs", "--max-shard-size", "1MB", "--out", args["out"]])

# The pushed model, pulled back through the real client, computes what the source computes.
ref = Encoder.from_pretrained(args["src"]).eval()
pulled = Encoder.from_pretrained("org/lfs").eval()
x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out["equal_outputs"] = torch.equal(ref(x), pulled(x))
    out["equal_state"] = all(torch.equal(v, pulled.state_dict()[k]) for k, v in ref.state_dict().items())

# What the client makes of each file: its etag, size, where it downloads it from, its cache blob.
out["meta"] = {}
for p in sorted(Path(args["out"]).iterdir()):
    m = get_hf_file_metadata(hf_hub_url("org/lfs", p.name))
    local = Path(hf_hub_download("org/lfs", p.name))
    out["meta"][p.name] = {"etag": m.etag, "size": m.size, "location": m.location, "blob": local.resolve().name,
                           "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
snap = Path(snapshot_download("org/lfs"))
out["snapshot"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in snap.iterdir() if p.is_file()}

api = HfApi()
# An object the repo already stores: the batch API gives no actions, nothing is PUT again.
shard = sorted(p for p in Path(args["out"]).iterdir() if p.suffix == ".safetensors")[0]
out["copy_path"] = "copies/" + shard.name
api.create_commit("org/lfs", [CommitOperationAdd(out["copy_path"], shard.read_bytes())], commit_message="copy")

# A commit naming an LFS object that never reached the Hub (the client is told it is uploaded).
ghost = CommitOperationAdd("ghost.safetensors", b"bytes that were never uploaded")
ghost._upload_mode = "lfs"
ghost._is_uploaded = True
out["ghost_oid"] = hashlib.sha256(b"bytes that were never uploaded").hexdigest()
try:
    api.create_commit("org/lfs", [ghost], commit_message="ghost")
    out["ghost"] = None
except Exception as e:
    out["ghost"] = f"{type(e).__name__}: {e}"
    out["ghost_status"] = getattr(getattr(e, "response", None), "status_code", None)
print("RESULT " + json.dumps(out))
"""

REPUSH = """
import json, sys
from pathlib import Path
import torch
from huggingface_hub import snapshot_download
from ascl.cli import main
from ascl.encoder import Encoder

args = json.loads(sys.argv[1])
out = {"first_rc": main(["push", args["src"], "--repo-id", "org/again", "--max-shard-size", "1MB",
                         "--out", args["out"]])}
out["first_files"] = sorted(p.name for p in Path(snapshot_download("org/again")).iterdir() if p.is_file())
# the second push, of another encoder in one file, onto the same repo
out["second_rc"] = main(["push", args["src2"], "--repo-id", "org/again", "--out", args["out2"]])
x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    new = Encoder.from_pretrained(args["src2"]).eval()
    out["equal"] = torch.equal(new(x), Encoder.from_pretrained("org/again", force_download=True).eval()(x))
out["files"] = sorted(p.name for p in Path(snapshot_download("org/again")).iterdir() if p.is_file())
print("RESULT " + json.dumps(out))
"""


def _run(script: str, args: dict[str, Any], hub: HubStandIn, hf_home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_HOME": str(hf_home), "HF_TOKEN": "hf_standin_token", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                **hub.client_env})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), json.dumps(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubStandIn, dict[str, Any], Path]]:
    """``ascl push`` of a width-16 encoder in 1 MB shards to org/lfs, then pulls and two raw commits."""
    tmp = tmp_path_factory.mktemp("hublfs")
    torch.manual_seed(3)
    src = tmp / "src"
    Encoder(image_size=16, width=16).eval().save_pretrained(src)
    args = {"src": str(src), "out": str(tmp / "out")}
    with HubStandIn() as hub:
        got = _run(SCRIPT, args, hub, tmp / "hf")
        yield hub, got, Path(args["out"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_push_sends_every_safetensors_through_lfs(pushed: tuple[HubStandIn, dict[str, Any], Path]) -> None:
    hub, got, out = pushed
    assert got["push_rc"] == 0
    folder = {p.name: p.read_bytes() for p in out.iterdir()}
    weights = {name: _sha256(data) for name, data in folder.items() if name.endswith(".safetensors")}
    assert len(weights) >= 2, sorted(folder)  # sharded: several objects, one batch
    assert {"README.md", "config.json", "model.safetensors.index.json"} <= set(folder)

    push = next(r for r in hub.commit_log("org/lfs") if r.summary.startswith("Upload org/lfs"))
    assert push.branch == "main"
    assert push.lfs == weights  # every .safetensors as an lfsFile entry naming its sha256...
    assert set(push.regular) == set(folder) - set(weights)  # ...README, config.json and the index inline
    assert "README.md" in push.regular and "config.json" in push.regular

    # Each object went through the batch API, one PUT to the storage origin, and the verify call.
    assert ("POST", "/org/lfs.git/info/lfs/objects/batch") in hub.requests
    puts = [p for m, p in hub.requests if m == "PUT"]
    assert sorted(puts) == sorted(f"/lfs-storage/org/lfs/{oid}" for oid in weights.values())
    assert sorted(oid for repo, oid, _ in hub.lfs_uploads if repo == "org/lfs") == sorted(weights.values())
    assert {oid for repo, oid in hub.lfs_verified if repo == "org/lfs"} == set(weights.values())

    # The repo stores them as LFS files, with the pushed bytes.
    assert hub.lfs_paths("org/lfs", push.sha) == weights
    stored = hub.repos["org/lfs"].commits[push.sha]
    assert all(stored[name] == data for name, data in folder.items())
    assert b"*.safetensors filter=lfs" in stored[".gitattributes"]


@pytest.mark.slow
def test_pushed_model_pulls_back_through_lfs_downloads(pushed: tuple[HubStandIn, dict[str, Any], Path]) -> None:
    hub, got, out = pushed
    assert got["equal_outputs"] is True and got["equal_state"] is True
    folder = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, data in folder.items():
        meta = got["meta"][name]
        assert meta["size"] == len(data) and meta["sha256"] == _sha256(data), name
        if name.endswith(".safetensors"):
            # LFS: the etag the client keeps (and names the cache blob by) is the object's sha256,
            # and the bytes come from the storage origin the Hub redirected to.
            assert meta["etag"] == meta["blob"] == _sha256(data), name
            assert meta["location"] == f"{hub.storage_url}/lfs-storage/org/lfs/{_sha256(data)}"
            assert ("GET", f"/lfs-storage/org/lfs/{_sha256(data)}") in hub.requests
        else:
            assert meta["etag"] == meta["blob"] == git_blob_sha1(data), name  # a regular file: its git oid
            assert meta["location"].startswith(f"{hub.url}/org/lfs/resolve/")
    assert got["snapshot"] == {name: _sha256(data) for name, data in folder.items()} | {
        ".gitattributes": _sha256(hub.files("org/lfs")[".gitattributes"])}


@pytest.mark.slow
def test_a_second_push_replaces_the_weights_of_the_first(tmp_path: Path) -> None:
    """Sharded weights, then another encoder in one file, onto one repo: the pull is the second encoder,
    with no shard or index of the first left to mix in."""
    torch.manual_seed(5)
    Encoder(image_size=16, width=16).eval().save_pretrained(tmp_path / "src")
    Encoder(image_size=16, width=8).eval().save_pretrained(tmp_path / "src2")
    args = {name: str(tmp_path / name) for name in ("src", "src2", "out", "out2")}
    with HubStandIn() as hub:
        got = _run(REPUSH, args, hub, tmp_path / "hf")
    assert got["first_rc"] == got["second_rc"] == 0
    assert "model.safetensors.index.json" in got["first_files"]  # the first push was sharded
    assert [name for name in got["files"] if "safetensors" in name] == ["model.safetensors"], got["files"]
    assert got["equal"] is True


@pytest.mark.slow
def test_object_already_stored_is_not_uploaded_again(pushed: tuple[HubStandIn, dict[str, Any], Path]) -> None:
    hub, got, out = pushed
    copy = next(r for r in hub.commit_log("org/lfs") if r.summary == "copy")
    oid = _sha256((out / got["copy_path"].split("/")[-1]).read_bytes())
    assert copy.lfs == {got["copy_path"]: oid} and copy.regular == []
    assert [o for _, o, _ in hub.lfs_uploads].count(oid) == 1  # the push's PUT only
    assert hub.lfs_paths("org/lfs")[got["copy_path"]] == oid


@pytest.mark.slow
def test_commit_naming_an_object_never_uploaded_is_refused(pushed: tuple[HubStandIn, dict[str, Any], Path]) -> None:
    hub, got, _ = pushed
    message = str(got["ghost"])
    assert message.startswith("BadRequestError") and got["ghost_status"] == 400, message
    assert "does not exist" in message and "ghost.safetensors" in message, message
    assert got["ghost_oid"] not in hub.repos["org/lfs"].lfs_objects
    assert "ghost.safetensors" not in hub.files("org/lfs")
    assert all(r.summary != "ghost" for r in hub.commit_log("org/lfs"))


# ---- the protocol, over plain HTTP --------------------------------------------------------------

def _http(method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed; (status, lower-cased headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _post_json(url: str, obj: Any) -> tuple[int, dict[str, str], Any]:
    status, headers, body = _http("POST", url, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    return status, headers, json.loads(body) if body else None


def _commit(hub: HubStandIn, repo_id: str, *entries: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    lines = [{"key": "header", "value": {"summary": "raw commit", "description": ""}}, *entries]
    body = "\n".join(json.dumps(x) for x in lines).encode()
    status, headers, data = _http("POST", f"{hub.url}/api/models/{repo_id}/commit/main", body,
                                  {"Content-Type": "application/x-ndjson"})
    return status, headers, json.loads(data)


@pytest.fixture()
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as h:
        status, _, _ = _post_json(f"{h.url}/api/repos/create", {"name": "raw", "organization": "org", "type": "model"})
        assert status == 200
        yield h


def _modes(hub: HubStandIn, files: dict[str, int]) -> dict[str, str]:
    payload = {"files": [{"path": p, "size": n, "sample": base64.b64encode(b"x").decode()} for p, n in files.items()]}
    status, _, answer = _post_json(f"{hub.url}/api/models/org/raw/preupload/main", payload)
    assert status == 200
    return {f["path"]: f["uploadMode"] for f in answer["files"]}


def test_preupload_answers_lfs_by_gitattributes_and_size(hub: HubStandIn) -> None:
    assert _modes(hub, {
        "model.safetensors": 100, "shards/model-00001-of-00002.safetensors": 100, "README.md": 100,
        "config.json": 100, "big.json": hub.lfs_threshold + 1, "plot.png": 100,
    }) == {
        "model.safetensors": "lfs", "shards/model-00001-of-00002.safetensors": "lfs", "README.md": "regular",
        "config.json": "regular", "big.json": "lfs", "plot.png": "regular",
    }
    # The repo's own .gitattributes decides: mark *.json as LFS and config.json follows.
    attrs = hub.files("org/raw")[".gitattributes"] + b"*.json filter=lfs diff=lfs merge=lfs -text\n"
    status, _, _ = _commit(hub, "org/raw", {"key": "file", "value": {
        "path": ".gitattributes", "content": base64.b64encode(attrs).decode(), "encoding": "base64"}})
    assert status == 200
    assert _modes(hub, {"config.json": 100, "README.md": 100}) == {"config.json": "lfs", "README.md": "regular"}


def test_lfs_batch_put_verify_commit_and_resolve(hub: HubStandIn) -> None:
    data = bytes(range(256)) * 40
    oid, size = _sha256(data), len(data)
    batch_url = f"{hub.url}/org/raw.git/info/lfs/objects/batch"
    batch = {"operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
             "objects": [{"oid": oid, "size": size}], "ref": {"name": "main"}}
    status, headers, answer = _post_json(batch_url, batch)
    assert status == 200 and answer["transfer"] == "basic"
    actions = answer["objects"][0]["actions"]
    assert actions["upload"]["href"].startswith(hub.storage_url) and "header" not in actions["upload"]

    # The commit may not name the object before it is uploaded...
    entry = {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": oid, "size": size}}
    status, headers, err = _commit(hub, "org/raw", entry)
    assert status == 400 and "does not exist" in err["error"] and "model.safetensors" in headers["x-error-message"]

    # ...and the PUT must carry exactly the object: the bytes hash to the oid, at the announced size.
    assert _http("PUT", actions["upload"]["href"], data[:-1] + b"\0")[0] == 400
    assert _http("PUT", actions["upload"]["href"], data[:-1])[0] == 400
    status, _, _ = _http("PUT", actions["upload"]["href"], data)
    assert status == 200 and hub.lfs_uploads == [("org/raw", oid, size)]
    assert _post_json(actions["verify"]["href"], {"oid": oid, "size": size})[0] == 200
    assert _post_json(actions["verify"]["href"], {"oid": oid, "size": size + 1})[0] == 404

    # Stored now: the batch API asks for nothing more.
    status, _, answer = _post_json(batch_url, batch)
    assert status == 200 and "actions" not in answer["objects"][0]

    status, _, err = _commit(hub, "org/raw", {**entry, "value": {**entry["value"], "size": size + 1}})
    assert status == 400 and "size" in err["error"]
    status, _, done = _commit(hub, "org/raw", entry)
    assert status == 200 and hub.lfs_paths("org/raw") == {"model.safetensors": oid}
    assert hub.files("org/raw")["model.safetensors"] == data

    # Downloads: a redirect to the object on the storage origin, with the metadata the client reads.
    status, headers, _ = _http("HEAD", f"{hub.url}/org/raw/resolve/main/model.safetensors")
    assert status == 302 and headers["x-repo-commit"] == done["commitOid"]
    assert headers["x-linked-etag"] == f'"{oid}"' and headers["x-linked-size"] == str(size)
    assert headers["location"] == f"{hub.storage_url}/lfs-storage/org/raw/{oid}"
    status, _, body = _http("GET", headers["location"])
    assert status == 200 and body == data
    status, _, tail = _http("GET", headers["location"], headers={"Range": "bytes=100-"})
    assert status == 206 and tail == data[100:]

    status, _, tree = _http("GET", f"{hub.url}/api/models/org/raw/tree/main")
    entry_of = {e["path"]: e for e in json.loads(tree)}
    assert entry_of["model.safetensors"]["lfs"] == {"oid": oid, "size": size, "pointerSize": len(lfs_pointer(oid, size))}
    assert "lfs" not in entry_of[".gitattributes"]

    # A regular file above the Hub's 10 MiB limit is refused inline.
    big = {"key": "file", "value": {"path": "big.bin", "content": base64.b64encode(b"\0" * (hub.lfs_threshold + 1))
                                    .decode(), "encoding": "base64"}}
    status, _, err = _commit(hub, "org/raw", big)
    assert status == 400 and "larger than 10 MiB" in err["error"]
