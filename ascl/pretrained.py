"""``PyTorchModelHubMixin`` made strict, through the mixin's documented hooks only.

The stock ``PyTorchModelHubMixin`` (huggingface_hub) writes one ``model.safetensors`` and loads
it non-strictly, builds a default model when ``config.json`` is missing, ignores unknown config
keys, and falls back to ``pytorch_model.bin`` (pickle). ``AsclHubMixin`` keeps the mixin's
public ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` and its card, and implements
the two hooks the mixin documents for a library:

- ``_save_pretrained(folder)``: safetensors through ``ascl.weights.save_weights``;
- ``_from_pretrained(model_id=...)``: a local hub folder, or the config and weights of a hub
  repo downloaded with ``snapshot_download``; then ``config.json`` read strictly (unknown keys
  and a missing file are errors) and every weight checked for key, shape and dtype.

Model names (``default``, the shipped models) are not the mixin's business: ``ascl.models``
resolves them. The project's model card is written by publishing (``ascl.model_cards``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import PyTorchModelHubMixin, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ascl.errors import FAILURE, AsclError
from ascl.weights import INDEX_FILE, SINGLE_FILE, load_weights_strict, save_weights

T = TypeVar("T", bound="AsclHubMixin")

CONFIG_FILE = constants.CONFIG_NAME  # config.json
# What loading needs from a repo: never README/plots, never pickle.
LOAD_PATTERNS = [CONFIG_FILE, SINGLE_FILE, INDEX_FILE, "model-*-of-*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"]
OFFLINE_HINT = (
    "Offline? Set HF_HUB_OFFLINE=1 to load from the local cache, or pass a local hub folder, "
    "a training run folder or a checkpoint (.pt) instead."
)


class ConfigError(AsclError, ValueError):
    """A config.json that does not describe a model this class can build."""


class ModelNotFoundError(AsclError, LookupError):
    """A repo id, revision or model name the hub (or its cache) cannot provide; the message says what to do."""

    exit_code = FAILURE  # the spec is well formed; fetching it failed


def is_hub_folder(path: Path) -> bool:
    """True for a folder written by ``save_pretrained`` (config.json beside the weights)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


class AsclHubMixin(PyTorchModelHubMixin):
    """Strict, pickle-free ``PyTorchModelHubMixin`` (see the module docstring)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's weight hook: safetensors, one file (``ascl.weights.save_weights`` shards on request)."""
        save_weights(self, Path(save_directory))  # type: ignore[arg-type]

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> T:
        """The mixin's loading hook: a hub folder or repo id -> the model, every weight checked."""
        if not strict:
            raise ValueError("ascl encoders load strictly only; a partial load would serve wrong embeddings")
        folder = Path(model_id)
        if not folder.is_dir():
            folder = download_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                     token=token, local_files_only=local_files_only)
        return cls.from_folder(folder, map_location=map_location, **model_kwargs)

    @classmethod
    def from_folder(cls: type[T], folder: Path, *, map_location: str = "cpu", **model_kwargs: Any) -> T:
        """Build from ``folder/config.json`` and load its safetensors strictly; eval mode.

        ``model_kwargs`` override config values (the mixin passes the config's own values
        back in, which changes nothing).
        """
        folder = Path(folder)
        config = read_config(folder, cls)
        config.update(model_kwargs)
        try:
            model = cls(**config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{folder / CONFIG_FILE}: {e}") from e
        load_weights_strict(model, folder, map_location=map_location)  # type: ignore[arg-type]
        model.eval()  # type: ignore[attr-defined]
        return model


def read_config(folder: Path, cls: type[Any]) -> dict[str, Any]:
    """``folder/config.json`` as constructor kwargs of ``cls``; unknown keys are an error."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_FILE} in {folder}; a hub folder holds {CONFIG_FILE} and safetensors weights")
    config = read_json_object(path, ConfigError, "constructor arguments")
    params = list(inspect.signature(cls).parameters)  # constructor arguments
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(params)}"
        )
    return config


def read_json_object(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object of {what}")
    return data


def download_folder(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
    everything: bool = False,
) -> Path:
    """Download (or find in the cache) the config and weights of a hub repo; the snapshot folder.

    The one download of the project: ``from_pretrained``, the resolver and ``ascl pull`` use it.
    ``everything`` also fetches the rest of the repo (card, plots), as ``ascl pull`` does; never
    pickle weights either way. Errors say whether the id, the revision or the network was the
    problem, and what to do.
    """
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=None if everything else LOAD_PATTERNS,
            ignore_patterns=PICKLE_PATTERNS if everything else None,
        )
    except HFValidationError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a folder, a checkpoint, a registered model name or a hub repo id (USER/NAME): {e}"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"revision {revision!r} not found in hub repo {repo_id!r} on {constants.ENDPOINT}") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelNotFoundError(
            f"model {where} not found on {constants.ENDPOINT} (or it is private and no valid token was given). "
            f"Check the id. {OFFLINE_HINT}"
        ) from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"model {where} is not in the local cache and the hub at {constants.ENDPOINT} could not be reached "
            f"or is disabled (HF_HUB_OFFLINE={int(constants.is_offline_mode())}). Download it once while online "
            "(ascl pull REPO_ID), or pass a local hub folder, run folder or checkpoint."
        ) from e
    except HfHubHTTPError as e:  # any other refusal or server error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot download {where} from {constants.ENDPOINT}: {first}\n{OFFLINE_HINT}") from e
    folder = Path(str(path))
    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"hub repo {where} has no {CONFIG_FILE}; it is not a model saved by save_pretrained")
    return folder
