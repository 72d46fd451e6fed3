"""Frameworks, shared modules, the loop, checkpoints and resume, on tiny CPU data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ascl.encoder import CIFAR10_MEAN, Encoder
from ascl.training.checkpoint import (
    CheckpointError,
    encoder_from_checkpoint,
    find_checkpoint,
    load_checkpoint,
)
from ascl.training.config import TrainConfig, load_config
from ascl.training.frameworks import build_framework
from ascl.training.loop import train
from ascl.training.metrics import read_metrics
from ascl.training.modules import MemoryQueue, SplitBatchNorm, convert_split_batchnorm, momentum_update
from ascl.training.schedule import warmup_cosine
from ascl.training.step import make_reference_step

TINY = [
    "data.spec=digits", "data.image_size=8", "data.num_workers=0", "data.subset=64", "batch_size=16",
    "model.head_hidden=32", "model.head_dim=16", "model.pred_hidden=32", "model.bn_splits=2",
    "moco.queue_size=16", "eval.knn_every=0", "device=cpu", "fast_path=off", "log_every=1",
    "optim.warmup_epochs=0", "optim.lr_per_256=2.0",
]


def tiny(*extra: str) -> TrainConfig:
    return load_config(None, [*TINY, *extra])


def losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(run_dir / "metrics.csv") if r["loss"]]


@pytest.mark.parametrize("framework", ["moco", "byol"])
@pytest.mark.parametrize("mode", ["ascl", "ahcl", "hard", "none"])
def test_one_step_each_framework_and_mode(framework: str, mode: str) -> None:
    torch.manual_seed(0)
    fw = build_framework(tiny(f"framework={framework}", f"loss.mode={mode}", "batch_size=8")).train()
    opt = torch.optim.SGD([p for p in fw.parameters() if p.requires_grad], lr=0.1)
    step = make_reference_step(fw, opt)
    enc_before = fw.encoder.backbone.conv1.weight.clone()
    target_before = fw.target_encoder.backbone.conv1.weight.clone()
    x_q, x_k = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    loss = step(x_q, x_k)
    assert loss.ndim == 0 and torch.isfinite(loss) and not loss.requires_grad
    assert not torch.equal(fw.encoder.backbone.conv1.weight, enc_before)  # the optimiser stepped
    assert fw.target_encoder.backbone.conv1.weight.requires_grad is False
    step(x_q, x_k)
    assert not torch.equal(fw.target_encoder.backbone.conv1.weight, target_before)  # the EMA followed
    if framework == "moco":
        assert int(fw.queue.ptr) == 0  # 2 batches of 8 in a queue of 16: wrapped exactly
    assert [type(m) for m in fw.momentum_pairs()[0]] == [type(fw.encoder), type(fw.target_encoder)]


def test_queue_ring_pointer_wraps_for_batches_that_do_not_divide_k() -> None:
    queue = MemoryQueue(10, 2)
    batches = [torch.full((4, 2), float(i)) for i in range(1, 4)]
    for b in batches:
        queue.enqueue(b)
    assert int(queue.ptr) == 2
    assert queue.keys[:, 0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]
    queue.enqueue(torch.full((25, 2), 9.0))  # bigger than K: keeps the newest K
    assert (queue.keys == 9).all() and int(queue.ptr) == 7


def test_split_batchnorm_is_batchnorm_per_group_and_plain_in_eval() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    split = convert_split_batchnorm(torch.nn.Sequential(bn), 2)[0]
    assert isinstance(split, SplitBatchNorm) and set(split.state_dict()) == set(bn.state_dict())
    x = torch.randn(8, 3, 4, 4)
    ref = torch.cat([F.batch_norm(x[:4], None, None, training=True), F.batch_norm(x[4:], None, None, training=True)])
    torch.testing.assert_close(split(x), ref, rtol=1e-4, atol=1e-5)
    split.eval()
    plain = torch.nn.BatchNorm2d(3).eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x))


def test_momentum_update_is_an_ema() -> None:
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * target.weight.detach() + 0.1 * online.weight.detach()
    momentum_update([(online, target)], 0.9)
    torch.testing.assert_close(target.weight.detach(), expected)


def test_warmup_then_cosine() -> None:
    lrs = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.01


def test_short_digits_run_loss_goes_down_and_every_weight_moves(tmp_path: Path) -> None:
    from ascl.training.loop import build_run

    run = tmp_path / "run"
    result = train(tiny("epochs=3"), run, progress=False)
    curve = losses(run)
    assert result.step == 12 and len(curve) == 12
    # step 1 sees a random queue; from step 2 the queue holds real keys
    assert sum(curve[-3:]) / 3 < sum(curve[1:4]) / 3 - 0.2, curve
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "curves.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    # the loss alone also falls with the optimiser never stepping (the queue fills with real keys): the
    # encoder's weights against the same network at step 0 show that the loop trained it
    initial = dict(build_run(tiny("epochs=3"), tmp_path / "step0").encoder.named_parameters())
    trained = dict(encoder_from_checkpoint(run).named_parameters())
    unchanged = [name for name, weight in trained.items() if torch.equal(weight, initial[name])]
    assert unchanged == [], unchanged


def test_resume_gives_the_same_next_steps(tmp_path: Path) -> None:
    full = train(tiny("epochs=2", "data.subset=48"), tmp_path / "full", progress=False)  # 3 steps/epoch
    assert full.step == 6
    first = train(tiny("epochs=2", "data.subset=48", "max_steps=2"), tmp_path / "cut", progress=False)
    assert first.step == 2 and not first.interrupted
    ckpt_path = find_checkpoint(tmp_path / "cut")
    ckpt = load_checkpoint(ckpt_path)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 2, 2)
    train(tiny("epochs=2", "data.subset=48"), tmp_path / "cut", resume=ckpt_path, ckpt=ckpt, progress=False)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(b) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)  # mid-epoch resume, then a full epoch: identical losses


def test_encoder_from_checkpoint_is_strict_and_matches(tmp_path: Path) -> None:
    train(tiny("max_steps=1"), tmp_path, progress=False)
    encoder = encoder_from_checkpoint(tmp_path)
    state = load_checkpoint(tmp_path)
    assert encoder.arch == "resnet18" and encoder.image_size == 8
    assert encoder.mean != CIFAR10_MEAN  # preprocessing facts measured on the training data
    fw = build_framework(tiny(), Encoder(**state["encoder_config"]))
    fw.load_state_dict(state["model"])
    x = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    fw.encoder.eval()
    torch.testing.assert_close(encoder.embed_uint8(x), fw.encoder.embed_uint8(x))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    train(tiny("max_steps=1"), tmp_path, progress=False)
    ckpt_path = find_checkpoint(tmp_path)
    state = load_checkpoint(ckpt_path)
    state["encoder_config"]["arch"] = "resnet34"  # weights are resnet18
    bad = tmp_path / "other.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"other\.pt.*resnet34"):
        encoder_from_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"last\.pt.*arch=resnet34"):
        train(tiny("max_steps=2", "model.arch=resnet34"), tmp_path, resume=ckpt_path, ckpt=load_checkpoint(ckpt_path),
              progress=False)


def test_foreign_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    foreign = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match=r"resnet\.pt: not an ASCL training checkpoint"):
        encoder_from_checkpoint(foreign)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(foreign.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        encoder_from_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        find_checkpoint(tmp_path)


def test_moco_forward_equals_its_parts_and_enqueues_the_keys() -> None:
    """One MoCo forward against a reference recomputed from its parts: momentum update, keys
    through the target networks in the shuffled order (split BN groups follow the shuffle),
    ASCLLoss(q, k, queue as it was before the step); then the queue's newest rows are k."""
    import copy

    from ascl.training.loss import ASCLLoss
    from ascl.training.modules import momentum_update

    fw = build_framework(tiny("batch_size=8", "moco.queue_size=20")).double().train()
    ref = copy.deepcopy(fw)
    g = torch.Generator().manual_seed(4)
    x_q, x_k = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(8, 3, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    ptr_before = int(fw.queue.ptr)
    torch.manual_seed(9)
    loss = fw(x_q, x_k)

    queue_before = ref.queue.keys.clone()
    q = F.normalize(ref.head(ref.encoder.forward_features(x_q)), dim=1)
    with torch.no_grad():
        momentum_update(ref.momentum_pairs(), ref.momentum)
        torch.manual_seed(9)
        perm = torch.randperm(8)  # the draw batch_shuffle makes on one process
        k_shuffled = F.normalize(ref.target_head(ref.target_encoder.forward_features(x_k[perm])), dim=1)
        k = k_shuffled[torch.argsort(perm)]
    expected = ASCLLoss(0.1, 0.05, 1, "ascl")(q, k, queue_before)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    newest = [(ptr_before + i) % 20 for i in range(8)]
    torch.testing.assert_close(fw.queue.keys[newest], k, rtol=1e-12, atol=1e-12)
    assert int(fw.queue.ptr) == (ptr_before + 8) % 20
    torch.testing.assert_close(fw.target_encoder.backbone.conv1.weight, ref.target_encoder.backbone.conv1.weight)


@pytest.mark.parametrize("mode", ["ascl", "none"])
def test_byol_value_is_the_symmetrised_loss(mode: str) -> None:
    """BYOL's value equals 0.5 (L(p_q, z_k) + L(p_k, z_q)), recomputed from its networks."""
    import copy

    from ascl.training.loss import BYOLRegressionLoss, InBatchASCLLoss
    from ascl.training.modules import momentum_update

    fw = build_framework(tiny("framework=byol", f"loss.mode={mode}", "batch_size=8")).double().train()
    ref = copy.deepcopy(fw)
    g = torch.Generator().manual_seed(5)
    x_q, x_k = (torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    value = fw(x_q, x_k)

    def online(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(ref.predictor(ref.projector(ref.encoder.forward_features(x))), dim=1)

    p_q, p_k = online(x_q), online(x_k)
    with torch.no_grad():
        momentum_update(ref.momentum_pairs(), ref.momentum)
        z_q, z_k = (F.normalize(ref.target_projector(ref.target_encoder.forward_features(x)), dim=1) for x in (x_q, x_k))
    loss = BYOLRegressionLoss() if mode == "none" else InBatchASCLLoss(0.1, 0.05, 1, mode)
    expected = 0.5 * (loss(p_q, z_k, 0) + loss(p_k, z_q, 0))
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_losses(tmp_path: Path) -> None:
    """``ascl train`` stopped by SIGTERM mid-run saves, exits 130, and ``--resume`` continues so
    that every logged loss equals the uninterrupted run's (fast CPU path, the recipe's path). The
    schedule spans 60 epochs; both runs stop at step 60 (``max_steps`` ends a run, it does not
    change its schedule)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 60
    sets = [s for s in TINY if not s.startswith("fast_path")] + ["fast_path=on", "epochs=60", "model.width=8"]
    full = train(load_config(None, [*sets, f"max_steps={steps}"]), tmp_path / "full", progress=False)
    assert full.step == steps
    cmd = [sys.executable, "-m", "ascl", "train", "--out", str(tmp_path / "cut"), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(losses(tmp_path / "cut")) < 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    cut = load_checkpoint(tmp_path / "cut")
    assert 10 <= cut["step"] < steps  # stopped mid-run, not at the end
    assert "ascl train --resume" in err
    rc = subprocess.run([*cmd[:3], "train", "--resume", str(tmp_path / "cut"), "--max-steps", str(steps),
                         "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(a) == len(b) == steps
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert load_checkpoint(tmp_path / "cut")["train_seconds"] > cut["train_seconds"] > 0


# A short run on CIFAR-10 at 16 px with a width-16 ResNet-18: random conv features separate CIFAR far
# less than they separate digits (on digits they are near the ceiling, and short training only moves
# away from it), so here a few hundred steps of ASCL show up in the kNN top-1.
CIFAR_SHORT = [
    "data.spec=cifar10-offline", "data.image_size=16", "data.subset=5000", "data.num_workers=0", "batch_size=64",
    "model.width=16", "model.bn_splits=4", "moco.queue_size=1024", "optim.lr_per_256=0.24", "optim.warmup_epochs=0",
    "eval.knn_every=0", "device=cpu", "log_every=50", "epochs=4", "max_steps=150",
]


@pytest.mark.slow
def test_training_beats_its_own_step_0_by_more_than_random_weights_differ(tmp_path: Path, cifar_tar: Path) -> None:
    """kNN top-1 (``ascl eval``'s evaluation, on held-out images) of the trained encoder against the same
    network at step 0 (``build_run``: the run's own seed and data statistics) and against two other
    random initialisations: training must gain more than 1.5x the largest gap between random networks,
    so neither a loop that never steps nor one that re-initialises the weights can pass."""
    from ascl.training.checkpoint import encoder_from_checkpoint
    from ascl.training.evaluate import EvalData, evaluate_knn
    from ascl.training.loop import build_run

    data = EvalData("cifar10-offline", train_subset=5000, val_subset=1000, device="cpu")

    def knn(encoder: Encoder) -> float:
        return float(evaluate_knn(encoder, data)["value"])

    at_step_0 = knn(build_run(load_config(None, CIFAR_SHORT), tmp_path / "step0").encoder)
    others = [knn(build_run(load_config(None, [*CIFAR_SHORT, f"seed={s}"]), tmp_path / f"seed{s}").encoder)
              for s in (1, 2)]
    result = train(load_config(None, CIFAR_SHORT), tmp_path / "run", progress=False)
    assert result.step == 150
    trained = knn(encoder_from_checkpoint(tmp_path / "run"))
    random_gap = max(abs(o - at_step_0) for o in others)
    assert trained - at_step_0 >= max(0.03, 1.5 * random_gap), (trained, at_step_0, others)
