"""Safetensors weights of a hub folder: sharded save and strict, pickle-free load.

``PyTorchModelHubMixin`` loads non-strictly by default and falls back to ``pytorch_model.bin``
(pickle). A published encoder must load exactly or not at all, so this module checks every
key, shape and dtype against the model and names the offending key or file in its errors.
The sharded layout is the hub's own (``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json``), written by ``huggingface_hub.save_torch_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import constants, save_torch_state_dict
from safetensors import SafetensorError, safe_open

from ascl.errors import AsclError

if TYPE_CHECKING:  # torch comes with the model; reading a folder's file list needs none
    import torch
    from torch import nn

SINGLE_FILE = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors
INDEX_FILE = constants.SAFETENSORS_INDEX_FILE  # model.safetensors.index.json
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"


class WeightsError(AsclError, ValueError):
    """Weights that do not match the model, or a weight file that cannot be read."""


def save_weights(model: nn.Module, folder: Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``model``'s state_dict as safetensors into ``folder``; returns the files written.

    One ``model.safetensors`` when it fits under ``max_shard_size`` (bytes or "16MB"), else
    shards plus the index. Old weight files in ``folder`` are removed first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    return weight_files(folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a hub folder, from its index when sharded.

    Raises WeightsError when there are none, when only pickle weights exist, or when the
    index is unreadable or names a shard that is absent.
    """
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_index(index)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{index} names shard(s) that are not in {folder}: {', '.join(missing)}")
        return [folder / n for n in names]
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
    if pickles:
        raise WeightsError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are never loaded here "
            "because unpickling can run code. Re-save the model with save_pretrained (safetensors)."
        )
    raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}; is it a hub folder written by save_pretrained?")


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-index file."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index} is not a readable safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise WeightsError(f"{index}: 'weight_map' must map tensor names to shard file names in the same folder")
    return weight_map


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a hub folder, each file opened with safetensors (no pickle).

    A truncated or corrupt file, a tensor stored in two shards, or an index that disagrees
    with the shards is a WeightsError naming the file.
    """
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in state:
                        raise WeightsError(f"tensor {key!r} is stored twice: in {origin[key]} and {path}")
                    state[key] = f.get_tensor(key)
                    origin[key] = path
        except SafetensorError as e:
            raise WeightsError(f"{path} is truncated or not a safetensors file ({e}); download or save it again") from e
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e}") from e
    index = folder / INDEX_FILE
    if index.exists():
        for key, shard in read_index(index).items():
            if origin.get(key) is None or origin[key].name != shard:
                raise WeightsError(f"{index} puts tensor {key!r} in {shard}, but that shard does not hold it")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise WeightsError unless ``state`` has exactly the model's keys, shapes and dtypes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise WeightsError(f"{source}: missing weight(s) {_few(missing)} expected by {type(model).__name__}")
    if extra:
        raise WeightsError(f"{source}: unexpected weight(s) {_few(extra)} not in {type(model).__name__}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise WeightsError(
                f"{source}: weight {key!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}; "
                "the config does not match these weights"
            )
        if got.dtype != want.dtype:
            raise WeightsError(f"{source}: weight {key!r} has dtype {got.dtype}, the model expects {want.dtype}")


def load_weights_strict(model: nn.Module, folder: Path, *, map_location: str | torch.device = "cpu") -> None:
    """Fill ``model`` from the safetensors in ``folder``; every key must match exactly."""
    state = read_weights(folder)
    check_state_dict(model, state, source=str(folder))
    model.load_state_dict(state, strict=True)
    model.to(map_location)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
