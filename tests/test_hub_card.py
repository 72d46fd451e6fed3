"""Model cards: rendered from typed facts, re-read with ModelCard.load, plots linked and present."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from ascl.cli import main
from ascl.encoder import Encoder
from ascl.hub import load_encoder
from ascl.model_cards.card import KNN, LINEAR, CardFacts, Metric
from ascl.model_cards.figures import pca_2d
from ascl.model_cards.publish import EvalRequest, Source, build_facts, save_encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(image_size=16, width=16).eval()


def test_card_metadata_survives_modelcard_load(encoder: Encoder, tmp_path: Path) -> None:
    facts = CardFacts(
        model_name="ascl-test", encoder_config=dict(encoder.config()), embedding_dim=encoder.embedding_dim,
        repo_id="org/ascl-test",
        training_data="CIFAR-10", datasets=["cifar10"], training_config={"epochs": 200, "loss": {"t1": 0.1}},
        hardware="1x NVIDIA H200", wall_time_s=583.0,
        metrics=[Metric(KNN, "kNN top-1 (k=200, t=0.1)", 88.31, "CIFAR-10", "cifar10", "validation", "test"),
                 Metric(LINEAR, "linear-probe top-1", 90.05, "CIFAR-10", "cifar10", "validation", "test")],
    )
    folder = save_encoder(encoder, tmp_path / "m", facts=facts)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "ascl-hub"
    assert card.data.license == "apache-2.0"
    assert {"ascl", "self-supervised", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    assert card.data.datasets == ["cifar10"]
    assert card.data.model_name == "ascl-test"
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["kNN top-1 (k=200, t=0.1)"].metric_value == pytest.approx(88.31)
    assert results["linear-probe top-1"].dataset_split == "validation"
    assert all(r.metric_type == "accuracy" and r.dataset_type == "cifar10" for r in results.values())
    text = card.text
    for needed in ("## Intended use", 'load_encoder("org/ascl-test")', "epochs: 200", "1x NVIDIA H200",
                   "0:09:43", "| kNN | kNN top-1 (k=200, t=0.1) | 88.31% | CIFAR-10 | validation |",
                   "## Limitations", "apache-2.0", "2207.11163", "Feng, Chen and Patras, Ioannis"):
        assert needed in text, needed
    assert "model-index" in (folder / "README.md").read_text()


def test_card_without_facts_says_not_evaluated(encoder: Encoder, tmp_path: Path) -> None:
    """The project's card is publishing's (save_encoder), not the mixin's: without facts it says so."""
    card = ModelCard.load(save_encoder(encoder, tmp_path / "bare") / "README.md")
    assert card.data.library_name == "ascl-hub" and not card.data.eval_results
    assert "has not been evaluated yet" in card.text


def test_pca_finds_the_spread_directions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32) * np.array([5, 0.1, 2, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    p = pca_2d(x)
    assert p.shape == (200, 2)
    assert p[:, 0].var() == pytest.approx(x[:, 0].var(), rel=0.05)
    assert p[:, 1].var() == pytest.approx(x[:, 2].var(), rel=0.05)


def test_run_folder_facts_recorded_knn_and_curve(encoder: Encoder, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 3, "data": {"spec": "cifar10-offline", "val_fraction": 0.1}}))
    with open(run / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "loss", "knn_top1", "wall_time_s"])
        w.writerows([[1, 6.0, "", 10], [2, 5.0, 0.41, 20], [3, 4.5, 0.47, 31.5]])
    facts, extra = build_facts(Source(encoder, run), tmp_path / "figs", name="r", repo_id="org/r",
                               evaluation=EvalRequest(enabled=False), hardware="1x test GPU")
    assert facts.hardware == "1x test GPU"
    assert facts.training_data == "CIFAR-10" and facts.datasets == ["cifar10"]
    assert facts.wall_time_s == 31.5 and facts.training_config == {"epochs": 3, "data": {"spec": "cifar10-offline", "val_fraction": 0.1}}
    [m] = facts.metrics
    assert m.value == pytest.approx(47.0) and "metrics.csv" in m.source and "val_fraction=0.1" in m.split
    assert facts.curve_png == "training_curve.png"
    assert extra["training_curve.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (one-step) 'ascl train' run on digits: checkpoint, config.yaml, metrics.csv, curves.png."""
    run = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--config", "digits_tiny", "--max-steps", "1", "--out", str(run), "--no-progress",
                 "--set", "eval.knn_every=100"]) == 0
    return run


def test_push_dry_run_from_training_run(run_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ascl.training.checkpoint import encoder_from_checkpoint, load_checkpoint

    out = tmp_path / "out"
    rc = main(["push", str(run_folder), "--repo-id", "org/digits", "--dry-run", "--out", str(out),
               "--eval-subset", "200", "--max-shard-size", "8MB", "--hardware", "2 CPU cores"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "kNN top-1 (k=200, t=0.1):" in printed and "linear-probe top-1:" in printed
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors.index.json", "embeddings_pca.png",
            "training_curve.png"} <= names
    # Encoder only: none of the queue, momentum encoder or heads of the checkpoint.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and all(k.startswith("backbone.") for k in index["weight_map"])
    assert len(load_checkpoint(run_folder)["model"]) > len(index["weight_map"])
    exported, trained = load_encoder(str(out)), encoder_from_checkpoint(run_folder)
    from_pt = load_encoder(str(run_folder / "checkpoints" / "last.pt"))
    assert all(torch.equal(v, from_pt.state_dict()[k]) for k, v in trained.state_dict().items())
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in trained.state_dict().items())
    card = ModelCard.load(out / "README.md")
    assert "(embeddings_pca.png)" in card.text and "(training_curve.png)" in card.text
    assert "name: digits_tiny" in card.text and "2 CPU cores" in card.text
    assert card.data.model_name == "digits"
    assert [r.metric_name for r in card.data.eval_results] == ["kNN top-1 (k=200, t=0.1)", "kNN top-1 (k=20, t=0.1)",
                                                             "linear-probe top-1"]
    # the card carries what was measured, and what was measured is the pushed encoder's accuracy: the same
    # evaluation run here on the exported folder agrees to within one val image
    for result in card.data.eval_results:
        assert f"{result.metric_name}: {result.metric_value:.2f}% on " in printed
    from ascl.training.evaluate import EvalData, evaluate_knn

    again = evaluate_knn(exported, EvalData("digits", 0.1, train_subset=200, val_subset=200, device="cpu"))
    one_image = 100 / again["val_images"]
    assert card.data.eval_results[0].metric_value == pytest.approx(100 * again["value"], abs=one_image + 1e-6)
    assert "last 10% of every class held out" in card.data.eval_results[0].dataset_split


def test_push_with_benchmark_run_info(encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default model's path: a hub folder from benchmarks/time_to_accuracy.py plus its result JSON."""
    src = save_encoder(encoder, tmp_path / "encoder")
    (tmp_path / "curve.png").write_bytes(_png())
    val_split = "last 10% of every class of the training split (500 per class on CIFAR-10)"
    info: dict[str, Any] = {"device": "NVIDIA H200", "train_seconds": 571.3, "png": "curve.png", "final_knn_top1": 88.4,
            "linear_probe_top1": 90.1,
            "recipe": {"epochs": 200, "batch_size": 512, "data": "cifar10-offline:/x/train.tar.gz",
                       "val_split": val_split}}
    (tmp_path / "result.json").write_text(json.dumps(info))
    out = tmp_path / "card"
    assert main(["push", str(src), "--repo-id", "ascl-hub/ascl-resnet18-cifar10", "--dry-run", "--out", str(out),
                 "--run-info", str(tmp_path / "result.json"), "--max-shard-size", "16MB"]) == 0, capsys.readouterr()
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["cifar10"] and card.data.model_name == "ascl-resnet18-cifar10"
    values = {r.metric_name: (r.metric_value, r.dataset_split) for r in card.data.eval_results}
    assert values["kNN top-1 (k=200, t=0.1)"][0] == pytest.approx(88.4)
    assert values["linear-probe top-1"] == (pytest.approx(90.1), val_split)
    for needed in ("NVIDIA H200", "0:09:31", "batch_size: 512", "(training_curve.png)", "recorded in result.json",
                   'load_encoder("ascl-resnet18-cifar10")'):
        assert needed in card.text, needed
    assert (out / "training_curve.png").read_bytes() == _png()


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


def test_push_rejects_bad_repo_id_and_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tmp_path), "--repo-id", "no-slash", "--dry-run"]) == 2  # bad input
    assert "USER/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nope.pt"), "--repo-id", "a/b", "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
