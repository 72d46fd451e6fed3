"""The real huggingface_hub client against a local stand-in Hub (``tests/hub_endpoint.py``).

``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` are read by huggingface_hub at import time,
so each scenario runs in a fresh Python process with its environment set, exactly as a user's
shell would. Online: download by repo id, revision and registered name, not-found messages,
``ascl push`` (create_repo, preupload, commit) and ``ascl pull``. Offline: the same loads come
from the cache and the shipped folder without a single request to the endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ascl.encoder import Encoder
from ascl.model_cards.publish import save_encoder

sys.path.insert(0, str(Path(__file__).parent))
from hub_endpoint import HubStandIn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two fresh Python processes, a push and a pull

PRELUDE = """
import json, sys, torch
from pathlib import Path
from ascl.cli import main
from ascl.hub import load_encoder
from ascl import registry
from ascl.encoder import Encoder
args = json.loads(sys.argv[1])
ref = Encoder.from_folder(Path(args["main"]))
out = {}
def same(e):
    return all(torch.equal(v, e.state_dict()[k]) for k, v in ref.state_dict().items())
def error_of(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
registry.SHIPPED_ROOT = Path(args["shipped_root"])
for name, repo in args["registered"].items():
    registry.MODELS[name] = registry.ShippedModel(name, repo, "test model")
"""

ONLINE = """
out["repo_id"] = same(Encoder.from_pretrained("org/name"))
out["revision_image_size"] = load_encoder("org/name", revision="v1").image_size
narrow = load_encoder("org/narrow")
out["narrow"] = [narrow.width, narrow.embedding_dim]
out["missing"] = error_of(lambda: load_encoder("org/missing"))
out["bad_revision"] = error_of(lambda: load_encoder("org/name", revision="nope"))
out["registered_online"] = same(load_encoder("hub-model"))
out["fallback_image_size"] = load_encoder("shipped-model").image_size
out["push_rc"] = main(["push", args["main"], "--repo-id", "org/pushed", "--max-shard-size", "1MB",
                       "--out", args["pushed"]])
out["dry_rc"] = main(["push", args["main"], "--repo-id", "org/pushed", "--max-shard-size", "1MB",
                      "--dry-run", "--out", args["dry"]])
out["branch_rc"] = main(["push", args["v1"], "--repo-id", "org/pushed", "--revision", "dev",
                        "--out", args["pushed"] + "-dev"])
out["branch_image_size"] = load_encoder("org/pushed", revision="dev").image_size
out["pull_rc"] = main(["pull", "org/pushed"])
out["pull_missing_rc"] = main(["pull", "org/missing"])
print("RESULT " + json.dumps(out))
"""

OFFLINE = """
out["repo_id"] = same(Encoder.from_pretrained("org/name"))
out["registered_cached"] = same(load_encoder("hub-model"))
out["shipped_image_size"] = load_encoder("shipped-model").image_size
out["never"] = error_of(lambda: load_encoder("org/never"))
out["absent"] = error_of(lambda: load_encoder("absent-model"))
out["default"] = error_of(lambda: load_encoder("ascl-resnet18-cifar10"))
out["pull_shipped_rc"] = main(["pull", "shipped-model"])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubStandIn, dict[str, Any], Path]]:
    """A stand-in hub serving org/name (main: sharded model, branch v1: a 16 px model)."""
    tmp = tmp_path_factory.mktemp("hubworld")
    torch.manual_seed(1)
    main_dir = tmp / "main"
    # width 16 (2.9 MB of weights) with 1 MB shards: three shards go over HTTP, as a large model's would
    save_encoder(Encoder(image_size=32, width=16).eval(), main_dir, max_shard_size="1MB")
    v1 = save_encoder(Encoder(image_size=16, width=16), tmp / "v1")
    narrow = save_encoder(Encoder(image_size=16, width=16), tmp / "narrow", max_shard_size="200KB")
    shipped_root = tmp / "shipped"
    save_encoder(Encoder(image_size=24, width=8), shipped_root / "shipped-model")
    args = {
        "main": str(main_dir), "v1": str(v1), "shipped_root": str(shipped_root), "pushed": str(tmp / "pushed"),
        "dry": str(tmp / "dry"), "hf_home": str(tmp / "hf"),
        "registered": {"hub-model": "org/name", "shipped-model": "org/not-there", "absent-model": "org/absent"},
    }
    with HubStandIn() as hub:
        hub.add_folder("org/name", main_dir)
        hub.add_folder("org/name", v1, branch="v1")
        hub.add_folder("org/narrow", narrow)
        yield hub, args, tmp


def _run(script: str, args: dict[str, Any], env_extra: dict[str, str]) -> tuple[dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    # HF_HUB_DISABLE_XET: the stand-in takes LFS files through the LFS batch API, not Xet (hub_endpoint.py).
    env.update({"HF_HOME": str(args["hf_home"]), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(script), json.dumps(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stdout + proc.stderr


def test_download_push_pull_then_offline(world: tuple[HubStandIn, dict[str, Any], Path]) -> None:
    hub, args, tmp = world
    online_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_standin_token"}
    got, output = _run(ONLINE, args, online_env)

    assert got["repo_id"] is True and got["registered_online"] is True
    assert got["revision_image_size"] == 16
    assert got["narrow"] == [16, 128]  # a width-16 encoder, sharded, through the real client
    assert "not found on http://127.0.0.1" in str(got["missing"]) and "HF_HUB_OFFLINE=1" in str(got["missing"])
    assert "revision 'nope' not found" in str(got["bad_revision"])
    assert got["fallback_image_size"] == 24  # registered, absent from the hub: the shipped copy
    resolve_gets = [p for m, p in hub.requests if m == "GET" and "/org/name/resolve/" in p]
    assert any(p.endswith("model.safetensors.index.json") for p in resolve_gets)
    assert sum("model-0000" in p for p in resolve_gets) >= 3  # every shard went over HTTP

    # ascl push uploaded exactly the folder that --dry-run writes.
    assert got["push_rc"] == 0 and got["dry_rc"] == 0
    dry = {p.name: p.read_bytes() for p in Path(args["dry"]).iterdir()}
    uploaded = {k: v for k, v in hub.files("org/pushed").items() if k != ".gitattributes"}
    assert set(uploaded) == set(dry) and all(uploaded[k] == dry[k] for k in dry)
    assert {"config.json", "README.md", "model.safetensors.index.json"} <= set(dry)
    assert ("POST", "/api/models/org/pushed/preupload/main") in hub.requests
    assert ("POST", "/api/models/org/pushed/commit/main") in hub.requests
    assert got["branch_rc"] == 0 and got["branch_image_size"] == 16  # --revision: a new branch
    assert json.loads(hub.files("org/pushed", "main")["config.json"])["image_size"] == 32  # main untouched
    assert got["pull_rc"] == 0 and got["pull_missing_rc"] == 1
    pulled = Path(next(x for x in output.splitlines() if "models--org--pushed" in x).strip())
    assert {p.name for p in pulled.iterdir()} == set(hub.files("org/pushed"))
    assert "model 'org/missing' not found" in output

    before = len(hub.requests)
    got, output = _run(OFFLINE, args, {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"})
    assert len(hub.requests) == before, hub.requests[before:]  # nothing left the machine
    assert got["repo_id"] is True and got["registered_cached"] is True
    assert got["shipped_image_size"] == 24
    assert "not in the local cache" in str(got["never"]) and "ascl pull" in str(got["never"])
    for key in ("absent", "default"):
        message = str(got[key])
        assert "is registered" in message and "Train one" in message and "run folder" in message, message
    assert "ascl-hub/ascl-resnet18-cifar10" in str(got["default"])
    assert got["pull_shipped_rc"] == 0
    assert str(Path(args["shipped_root"]) / "shipped-model") in output.splitlines()
