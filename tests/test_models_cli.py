"""``ascl models``: the shipped and cached encoders, the default marked, and ``--path NAME``.

A registry of our own (a shipped model with a card that reports its kNN accuracy, a registered
model that is not shipped) and a Hugging Face cache in the layout the hub client writes
(blobs, snapshot symbolic links, refs), so nothing depends on what this checkout ships.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ascl import registry
from ascl.cli import main
from ascl.encoder import Encoder
from ascl.model_cards import catalog
from ascl.model_cards.card import KNN, CardFacts, Metric
from ascl.model_cards.publish import save_encoder


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """``folder``'s files as the hub client caches a download of ``repo_id``; the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snapshot


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    torch.manual_seed(0)
    shipped_root = tmp_path / "shipped"
    encoder = Encoder(width=16, image_size=16)
    facts = CardFacts(model_name="tiny-w16", encoder_config=encoder.config(), embedding_dim=encoder.embedding_dim,
                      metrics=[Metric(KNN, "kNN top-1 (k=200, t=0.1)", 71.25, "CIFAR-10", "cifar10", "val", "test")])
    save_encoder(encoder, shipped_root / "tiny-w16", facts=facts)
    cached = save_encoder(Encoder(width=8, image_size=16), tmp_path / "other")
    cache = tmp_path / "hf" / "hub"
    snapshot = fake_hub_cache(cache, "org/other", cached)
    monkeypatch.setattr(registry, "SHIPPED_ROOT", shipped_root)
    monkeypatch.setattr(registry, "MODELS", {
        "tiny-w16": registry.ShippedModel("tiny-w16", "org/tiny-w16", "a tiny test model", use="tests only"),
        "not-here": registry.ShippedModel("not-here", "org/not-here", "registered, not shipped"),
    })
    monkeypatch.setattr(registry, "DEFAULT_MODEL", "tiny-w16")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return {"shipped": shipped_root / "tiny-w16", "snapshot": snapshot}


def test_list_shows_shipped_and_cached_with_the_default_marked(world: dict[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["name", "arch", "width", "dim", "input", "kNN", "top-1"]
    shipped = next(line for line in lines if "tiny-w16" in line)
    assert shipped.startswith("*") and "resnet18" in shipped and " 16 " in shipped and " 128 " in shipped
    assert " 16 px " in shipped and "tests only" in shipped
    assert "71.25%" in shipped and "shipped" in shipped and str(world["shipped"]) in shipped
    cached = next(line for line in lines if "org/other" in line)
    assert not cached.startswith("*") and " 8 " in cached and " 64 " in cached and "cache" in cached
    assert str(world["snapshot"]) in cached and "not-here" not in "\n".join(lines)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["tiny-w16"]["is_default"] and by_name["tiny-w16"]["knn_top1"] == 71.25
    assert by_name["tiny-w16"]["image_size"] == 16 and by_name["tiny-w16"]["use"] == "tests only"
    assert by_name["org/other"]["use"] == ""
    assert by_name["org/other"]["size_bytes"] > 100_000  # weights counted through the blob links


def test_path_prints_one_folder_and_nothing_else(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for name, folder in (("default", world["shipped"]), ("tiny-w16", world["shipped"]),
                         ("org/other", world["snapshot"])):
        assert main(["models", "--path", name]) == 0
        assert capsys.readouterr().out == f"{folder}\n"
    loaded = Encoder.from_folder(catalog.model_path("default"))
    assert loaded.width == 16


def test_a_missing_default_is_a_clear_error(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(registry, "DEFAULT_MODEL", "not-here")
    assert main(["models", "--path", "default"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "the default model is not-here" in captured.err and "ascl pull org/not-here" in captured.err
    assert main(["models", "--path", "org/never"]) == 1
    assert main(["models"]) == 0
    assert not any(line.startswith("*") for line in capsys.readouterr().out.splitlines())  # no default here


def test_load_encoder_without_a_name_uses_the_default(world: dict[str, Path]) -> None:
    from ascl.hub import load_encoder

    assert load_encoder().width == 16 and load_encoder("default").embedding_dim == 128
