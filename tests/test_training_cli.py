"""``ascl train`` / ``ascl eval knn`` / ``ascl eval linear`` end to end on tiny digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ascl.cli import main
from ascl.training.checkpoint import load_checkpoint

TINY_SET = [
    "data.image_size=8", "data.subset=64", "model.head_hidden=32", "model.head_dim=16", "model.bn_splits=2",
    "moco.queue_size=16", "eval.knn_every=0", "log_every=1",
]


def tiny_args(*extra: str) -> list[str]:
    args = ["train", "--config", "digits_tiny", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    for s in TINY_SET:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny_args("--out", str(run), "--max-steps", "3")) == 0
    return run


def test_train_writes_the_run_folder(trained_run: Path) -> None:
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["data"]["spec"] == "digits" and saved["model"]["head_dim"] == 16 and saved["max_steps"] == 3
    assert load_checkpoint(trained_run)["step"] == 3
    assert (trained_run / "metrics.csv").read_text().count("\n") == 4  # header + 3 steps


def test_eval_knn_and_linear(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The commands report the run's encoder measured on the subsets asked for: the same figures as the
    library's evaluation of that checkpoint (what training adds over step 0: test_training)."""
    from ascl.training.checkpoint import encoder_from_checkpoint
    from ascl.training.evaluate import EvalData, evaluate_knn, evaluate_linear

    out = tmp_path / "knn.json"
    assert main(["eval", "knn", str(trained_run), "--train-subset", "300", "--val-subset", "60", "--k", "20",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "knn_top1" and (result["k"], result["t"]) == (20, 0.1)
    assert result["data"] == "digits" and result["train_images"] == 300 and result["val_images"] == 60
    assert f"knn_top1: {100 * result['value']:.2f}% on 60 val images" in capsys.readouterr().out
    encoder = encoder_from_checkpoint(trained_run)
    data = EvalData("digits", train_subset=300, val_subset=60, device="cpu")
    assert result["value"] == pytest.approx(evaluate_knn(encoder, data, k=20)["value"], abs=1e-9)
    lin = tmp_path / "linear.json"
    assert main(["eval", "linear", str(trained_run / "checkpoints" / "last.pt"), "--train-subset", "300",
                 "--val-subset", "60", "--epochs", "20", "--device", "cpu", "--json", str(lin)]) == 0
    result = json.loads(lin.read_text())
    assert result["metric"] == "linear_top1" and result["epochs"] == 20 and result["val_images"] == 60
    assert result["value"] == pytest.approx(evaluate_linear(encoder, data, epochs=20)["value"], abs=1e-9)


def test_resume_through_the_cli(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0
    assert load_checkpoint(run)["step"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 4


def test_existing_run_needs_resume(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args("--out", str(trained_run))) == 2
    assert "--resume" in capsys.readouterr().err


def test_unknown_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args("--out", str(tmp_path / "r"), "--set", "loss.temperature=0.2")) == 2
    err = capsys.readouterr().err
    assert "loss.temperature" in err and "t1" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\ndata:\n  spec: digits\n  imagesize: 32\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "data.imagesize" in err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_print_config_applies_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--framework", "byol", "--mode", "ahcl", "--set", "augment.blur_p=0.0", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["framework"] == "byol" and cfg["loss"]["mode"] == "ahcl" and cfg["augment"]["blur_p"] == 0.0
    assert cfg["epochs"] == 200 and cfg["data"]["spec"] == "cifar10-offline"  # the paper's recipe by default


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn", str(tmp_path / "nothing.pt"), "--data", "digits"]) == 2
    assert "nothing.pt" in capsys.readouterr().err
