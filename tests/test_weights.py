"""Hub folders: save -> load round trips, sharding, and strict loading of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ascl.encoder import Encoder
from ascl.hub import load_encoder
from ascl.model_cards.publish import save_encoder
from ascl.pretrained import ConfigError
from ascl.weights import WeightsError

KEY = "backbone.layer1.0.conv1.weight"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(arch="resnet18", stem="cifar", image_size=16)
    # Non-default BN statistics, so a loader that skipped buffers would be caught.
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return enc.eval()


@pytest.fixture(scope="module")
def saved(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_encoder(encoder, tmp_path_factory.mktemp("hub") / "model")


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_round_trip_is_bit_identical(encoder: Encoder, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((saved / "config.json").read_text())["image_size"] == 16
    loaded = load_encoder(str(saved))
    assert not loaded.training
    want, got = encoder.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(encoder.embed_uint8(images), loaded.embed_uint8(images))


def test_sharded_save_loads_back(encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    save_encoder(encoder, folder, max_shard_size="4MB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(encoder.state_dict())
    assert {p.name for p in shards} == set(index["weight_map"].values())
    biggest = max(v.numel() * v.element_size() for v in encoder.state_dict().values())
    assert all(p.stat().st_size <= max(4_000_000, biggest) + 100_000 for p in shards)
    loaded = Encoder.from_pretrained(folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())


def test_wrong_shape_names_the_key(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "bad")
    state = load_file(folder / "model.safetensors")
    state[KEY] = torch.zeros(3, 3, 1, 1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=rf"'{KEY}' has shape \(3, 3, 1, 1\).*expects \(64, 64, 3, 3\)"):
        load_encoder(str(folder))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_weight_names_the_key(saved: Path, tmp_path: Path, change: str) -> None:
    folder = _copy(saved, tmp_path / change)
    state = load_file(folder / "model.safetensors")
    if change == "missing":
        del state[KEY]
    else:
        state["head.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=f"{change if change == 'missing' else 'unexpected'} weight.*"
                       + (KEY if change == "missing" else "head.weight")):
        Encoder.from_pretrained(folder)


def test_truncated_shard_names_the_file(encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "trunc"
    save_encoder(encoder, folder, max_shard_size="4MB")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"{shard.name} is truncated"):
        load_encoder(str(folder))
    shard.unlink()
    with pytest.raises(WeightsError, match=f"shard.*not in.*{shard.name}"):
        load_encoder(str(folder))


def test_corrupt_file_names_the_file(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "garbage")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:16] = b"\xff" * 16  # header length and start of the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors is truncated or not a safetensors file"):
        load_encoder(str(folder))


def test_unknown_architecture_and_key_in_config(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "cfg")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "arch": "vit_b16"}))
    with pytest.raises(ConfigError, match=r"config\.json: unknown arch 'vit_b16'"):
        load_encoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ConfigError, match=r"config\.json: unknown key\(s\) 'depth'"):
        load_encoder(str(folder))


def test_pickle_weights_are_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "pickle")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="only pickle weights"):
        Encoder.from_pretrained(folder)


def test_failed_save_leaves_old_folder(encoder: Encoder, saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "keep")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="relative"):
        save_encoder(encoder, folder, extra_files={"/etc/passwd": saved / "config.json"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
