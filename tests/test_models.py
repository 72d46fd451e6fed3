"""The model resolver (``ascl.models.resolve_model``): every kind of spec, its errors, and which ones
may reach the Hub.

One table of specs against one small world in a temporary working folder: a hub folder (and a
sharded one), a training run folder and its checkpoint, a loose checkpoint, an ``.onnx`` file,
an export folder holding ``model.onnx``, an empty ``runs/`` folder for typos, and a local stand-in
of the Hub (the real ``huggingface_hub`` client, pointed at ``tests/hub_endpoint.py``) whose
request log shows whether a spec was sent to the Hub at all.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hub_endpoint import HubStandIn

from ascl.checkpoints import CheckpointError
from ascl.cli import main
from ascl.encoder import Encoder
from ascl.errors import USAGE, AsclError
from ascl.model_cards.publish import save_encoder
from ascl.models import ModelRef, ModelSpecError, load_encoder, resolve_model
from ascl.pretrained import ModelNotFoundError
from ascl.registry import DEFAULT_MODEL, MODELS, lookup

NOT_SHIPPED = next(name for name, entry in MODELS.items() if not entry.is_shipped())


@dataclass
class World:
    root: Path  # the working folder of every test here (read only)
    scratch: Path  # the test's own folder
    hub: HubStandIn
    encoder: Encoder  # the weights of hub-w8, runs/brief and loose.pt

    def hub_requests(self) -> list[tuple[str, str]]:
        return list(self.hub.requests)


def _checkpoint(encoder: Encoder, path: Path) -> Path:
    """``encoder`` in the training checkpoint format (what ``ascl train`` writes)."""
    from ascl.training.checkpoint import ENCODER_PREFIX, save_checkpoint

    weights = {ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    return save_checkpoint(path, {"encoder_config": encoder.config(), "model": weights})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Encoder]:
    """The world's files, made once and only read by the tests."""
    from serving_helpers import export_random_encoder

    root = tmp_path_factory.mktemp("resolver-world")
    torch.manual_seed(0)
    encoder = Encoder(width=8, image_size=16).eval()
    save_encoder(encoder, root / "hub-w8")
    save_encoder(encoder, root / "sharded", max_shard_size="100KB")
    _checkpoint(encoder, root / "runs" / "brief" / "checkpoints" / "last.pt")
    _checkpoint(encoder, root / "loose.pt")
    export_random_encoder(root / "encoder.onnx")
    (root / "export").mkdir()
    (root / "export" / "model.onnx").symlink_to(root / "encoder.onnx")
    shutil.copytree(root / "hub-w8", root / "both")  # a hub folder that also holds an export
    (root / "both" / "model.onnx").symlink_to(root / "encoder.onnx")
    (root / "empty").mkdir()
    return root, encoder


@pytest.fixture(scope="module")
def hub(files: tuple[Path, Encoder]) -> Iterator[HubStandIn]:
    """One stand-in Hub for the module: ``org/remote`` at main (hub-w8) and at v2 (sharded)."""
    root, _ = files
    with HubStandIn() as stand_in:
        stand_in.add_folder("org/remote", root / "hub-w8")
        stand_in.add_folder("org/remote", root / "sharded", branch="v2")
        yield stand_in


@pytest.fixture()
def world(files: tuple[Path, Encoder], hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    root, encoder = files
    monkeypatch.chdir(root)
    hub.requests.clear()
    # huggingface_hub reads HF_ENDPOINT and HF_HOME at import; its functions read these at call time
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return World(root, tmp_path, hub, encoder)


@dataclass(frozen=True)
class Case:
    spec: str | None
    kind: str | None = None  # the ref's kind; None: an error is expected
    path: str | None = None  # where the ref's weights are, relative to the world (hub_repo: not local)
    name: str | None = None
    revision: str | None = None
    error: type[Exception] | None = None
    message: str = ""
    asks_hub: bool = False  # whether resolving it may send a request to the Hub

    @property
    def id(self) -> str:
        return f"{self.spec}@{self.revision}" if self.revision else str(self.spec)


CASES = [
    Case("random", "random", None, "random"),
    Case("random:7", "random", None, "random:7"),
    Case("random:seven", error=ModelSpecError, message="the seed of 'random:SEED' must be a whole number"),
    Case("random:-1", error=ModelSpecError, message="must be a whole number"),
    Case("hub-w8", "hub_folder", "hub-w8", "hub-w8"),
    Case("hub-w8/model.safetensors", "hub_folder", "hub-w8", "hub-w8"),  # a weight file: its folder
    Case("sharded/{first_shard}", "hub_folder", "sharded", "sharded"),  # one shard of a sharded folder
    Case("both", "hub_folder", "both", "both"),  # config.json beside model.onnx: the hub folder
    Case("runs/brief", "run_folder", "runs/brief", "brief"),
    Case("runs/brief/checkpoints/last.pt", "checkpoint", "runs/brief/checkpoints/last.pt", "brief"),
    Case("loose.pt", "checkpoint", "loose.pt", "loose"),
    Case("encoder.onnx", "onnx", "encoder.onnx", "encoder"),
    Case("export", "onnx", "export/model.onnx", "export"),  # an export folder: its model.onnx
    Case("hub-w8", revision="v2", error=ModelSpecError, message="--revision applies to hub repos only"),
    Case("runs/brief", revision="main", error=ModelSpecError, message="--revision applies to hub repos only"),
    Case("encoder.onnx", revision="v2", error=ModelSpecError, message="--revision applies to hub repos only"),
    Case("missing.onnx", error=ModelSpecError, message="no such ONNX file"),
    # typos of local paths never become Hub requests
    Case("runs/typo", error=ModelSpecError, message="does not exist; --model takes"),
    Case("./hub-w9", error=ModelSpecError, message="does not exist"),
    Case("/no/such/folder", error=ModelSpecError, message="does not exist"),
    Case("~/no-such-ascl-model", error=ModelSpecError, message="does not exist"),
    Case("brief.pt", error=ModelSpecError, message="does not exist"),
    Case("org/remote/typo", error=ModelSpecError, message="does not exist"),
    Case("empty", error=CheckpointError, message="no checkpoints/last.pt in this folder"),
    Case("not a repo id", error=ModelNotFoundError, message="is not a folder, a checkpoint, a registered model name"),
    # well-formed repo ids and registered names go to the Hub
    Case("org/remote", "hub_repo", None, "org/remote", asks_hub=True),
    Case("org/remote", "hub_repo", None, "org/remote", revision="v2", asks_hub=True),
    Case("org/absent", error=ModelNotFoundError, message="model 'org/absent' not found on", asks_hub=True),
    Case(NOT_SHIPPED, error=ModelNotFoundError, message="is registered (hub repo", asks_hub=True),
    Case(None, "shipped", None, DEFAULT_MODEL),
    Case("default", "shipped", None, DEFAULT_MODEL),
    Case(DEFAULT_MODEL, "shipped", None, DEFAULT_MODEL),
]


def spec_in(world: World, case: Case) -> str | None:
    """The case's spec with ``{first_shard}`` filled in (the shard count depends on the weights' size)."""
    if case.spec is None:
        return None
    return case.spec.replace("{first_shard}", sorted((world.root / "sharded").glob("model-*.safetensors"))[0].name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_resolve(world: World, case: Case) -> None:
    spec = spec_in(world, case)
    if case.error is not None:
        with pytest.raises(case.error) as info:
            resolve_model(spec, revision=case.revision)
        assert case.message in str(info.value), info.value
        assert isinstance(info.value, AsclError)
    else:
        ref = resolve_model(spec, revision=case.revision)
        assert (ref.kind, ref.name, ref.revision) == (case.kind, case.name, case.revision)
        if case.path is not None:
            assert ref.path is not None and ref.path.resolve() == (world.root / case.path).resolve()
        if ref.kind == "hub_repo":  # a local snapshot of the revision asked for
            assert ref.repo_id == case.spec and ref.path is not None and ref.path.is_dir()
            wanted = "sharded" if case.revision == "v2" else "hub-w8"
            assert sorted(p.name for p in ref.path.glob("*.safetensors")) == sorted(
                p.name for p in (world.root / wanted).glob("*.safetensors"))
        if ref.kind == "shipped":
            entry = lookup(DEFAULT_MODEL)
            assert entry is not None and ref.path == entry.folder() and ref.repo_id == entry.repo_id
    asked = world.hub_requests()
    assert bool(asked) == case.asks_hub, asked


def test_random_seeds(world: World) -> None:
    seven, again, eight = (resolve_model(s) for s in ("random:7", "random:7", "random:8"))
    assert (seven.seed, eight.seed, resolve_model("random").seed) == (7, 8, 0)
    assert seven.content_key == again.content_key != eight.content_key
    a, b, c = (ref.load_encoder() for ref in (seven, again, eight))
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(a.embed_uint8(x), b.embed_uint8(x))
    assert not torch.allclose(a.embed_uint8(x), c.embed_uint8(x))
    assert "RANDOMLY INITIALISED" in seven.description and "seed 7" in seven.description


def test_every_local_kind_loads_the_same_weights(world: World) -> None:
    x = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8)
    want = world.encoder.embed_uint8(x)
    for spec in ("hub-w8", "hub-w8/model.safetensors", "sharded", "runs/brief", "runs/brief/checkpoints/last.pt",
                 "loose.pt", "org/remote"):
        torch.testing.assert_close(load_encoder(spec).embed_uint8(x), want, msg=spec)


def test_load_encoder_of_an_onnx_reference_says_what_to_pass(world: World) -> None:
    for spec in ("encoder.onnx", "export"):
        ref = resolve_model(spec)
        assert ref.onnx_path is not None and ref.onnx_path.is_file()
        with pytest.raises(ModelSpecError, match="exported ONNX graph, not PyTorch weights; pass the model it was "
                                                  "exported from"):
            ref.load_encoder()
        with pytest.raises(ModelSpecError, match="not PyTorch weights"):
            load_encoder(spec)


def test_content_key_follows_the_bytes_not_the_path(world: World) -> None:
    elsewhere = world.scratch / "elsewhere"
    shutil.copytree(world.root / "hub-w8", elsewhere)
    here, there = resolve_model("hub-w8"), resolve_model(str(elsewhere))
    assert here.content_key == there.content_key and len(here.content_key) == 16
    assert resolve_model("runs/brief").content_key == resolve_model("runs/brief/checkpoints/last.pt").content_key
    config = elsewhere / "config.json"
    config.write_text(config.read_text() + "\n")  # one byte more
    assert ModelRef(str(elsewhere), "hub_folder", "elsewhere", elsewhere).content_key != here.content_key
    assert resolve_model("encoder.onnx").source_revision == f"sha256:{resolve_model('encoder.onnx').content_key}"
    assert resolve_model("org/remote", revision="v2").source_revision == "v2"


def test_a_mistyped_model_on_the_command_line_is_exit_2_before_any_work(world: World,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = world.scratch / "idx"
    assert main(["index", "build", "--model", "runs/typo", "--images", "digits", "--out", str(out)]) == USAGE
    err = capsys.readouterr().err
    assert "runs/typo does not exist" in err and "Traceback" not in err
    assert not out.exists() and world.hub_requests() == []
