"""``PyTorchModelHubMixin`` with the guarantees a published encoder needs.

The stock mixin (huggingface_hub 2.x) writes one ``model.safetensors`` and loads it
non-strictly, silently builds a default model when ``config.json`` is missing, and falls back
to ``pytorch_model.bin`` (pickle). This subclass keeps its class-level metadata, config.json
handling, card generation and ``push_to_hub``, and changes three things:

- ``save_pretrained(..., max_shard_size=...)`` writes shards in the hub's sharded-index format;
- ``from_pretrained`` is strict: config keys, weight keys, shapes and dtypes must match, and
  errors name the key or file; no pickle is ever read;
- names registered in ``ascl.model_cards.registry`` (``default`` included) resolve to the
  folder shipped with the package when it holds their weights, else to their hub repo.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ascl.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_FILE,
    SINGLE_FILE,
    load_weights_strict,
    save_weights,
)

log = logging.getLogger(__name__)

T = TypeVar("T", bound="AsclHubMixin")

CONFIG_FILE = constants.CONFIG_NAME  # config.json
# What loading needs from a repo: never README/plots, never pickle.
LOAD_PATTERNS = [CONFIG_FILE, SINGLE_FILE, INDEX_FILE, "model-*-of-*.safetensors"]
OFFLINE_HINT = (
    "Offline? Set HF_HUB_OFFLINE=1 to load from the local cache, or pass a local hub folder, "
    "a training run folder or a checkpoint (.pt) instead."
)


class ConfigError(ValueError):
    """A config.json that does not describe a model this class can build."""


class ModelNotFoundError(LookupError):
    """A repo id, revision or registered name that cannot be found; the message says what to do."""


def card_template() -> str:
    """The Jinja model-card template shipped in ``ascl.model_cards``."""
    return resources.files("ascl.model_cards").joinpath("card_template.md").read_text(encoding="utf-8")


class AsclHubMixin(PyTorchModelHubMixin):
    """Strict, sharding, registry-aware ``PyTorchModelHubMixin`` (see the module docstring)."""

    def __init_subclass__(cls, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_card_template", card_template())
        super().__init_subclass__(*args, **kwargs)

    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: dict[str, Any] | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write config.json, safetensors (sharded above ``max_shard_size``) and README.md.

        An existing README.md is kept (as the stock mixin does), so a richer card written
        first by ``ascl.hub.save_encoder`` survives.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self, folder, max_shard_size=max_shard_size)  # type: ignore[arg-type]
        config = config if config is not None else self._hub_mixin_config  # type: ignore[assignment]
        if config is not None:
            (folder / CONFIG_FILE).write_text(json.dumps(config, sort_keys=True, indent=2), encoding="utf-8")
        readme = folder / "README.md"
        if not readme.exists():
            self.generate_model_card(**(model_card_kwargs or {})).save(readme)
        if push_to_hub:
            kwargs = dict(push_to_hub_kwargs)
            if config is not None:
                kwargs["config"] = config
            return self.push_to_hub(repo_id=repo_id or folder.name, model_card_kwargs=model_card_kwargs, **kwargs)
        return None

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card from the class metadata and the project's template (``ascl.model_cards``)."""
        from ascl.model_cards.card import CardFacts, render_card

        facts = kwargs.pop("facts", None) or CardFacts.minimal(self)
        info = self._hub_mixin_info
        return render_card(
            facts,
            card_data=info.model_card_data,
            template=info.model_card_template,
            repo_url=info.repo_url,
            paper_url=info.paper_url,
        )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[T],
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> T:
        """Load from a hub folder, a registered model name, or a hub repo id (with ``revision``).

        Strict: config keys must be constructor arguments, and every weight must match the
        model's key, shape and dtype. Errors name the file or key.
        """
        folder = resolve_folder(
            str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        return cls.from_folder(folder, map_location=map_location, **model_kwargs)

    @classmethod
    def from_folder(cls: type[T], folder: Path, *, map_location: str = "cpu", **model_kwargs: Any) -> T:
        """Build from ``folder/config.json`` and load its safetensors strictly; eval mode."""
        config = read_config(folder, cls)
        config.update(model_kwargs)
        try:
            model = cls(**config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{folder / CONFIG_FILE}: {e}") from e
        load_weights_strict(model, folder, map_location=map_location)  # type: ignore[arg-type]
        model.eval()  # type: ignore[attr-defined]
        if not model._hub_mixin_config:
            model._hub_mixin_config = config
        return model


def read_config(folder: Path, cls: type[Any]) -> dict[str, Any]:
    """``folder/config.json`` as constructor kwargs of ``cls``; unknown keys are an error."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no {CONFIG_FILE} in {folder}; a hub folder holds {CONFIG_FILE} and safetensors weights")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object of constructor arguments")
    params = list(inspect.signature(cls).parameters)  # constructor arguments
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; {cls.__name__} takes {', '.join(params)}"
        )
    return config


def resolve_folder(
    spec: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder holding config + weights for ``spec``: a folder, a registered name or a repo id."""
    from ascl.model_cards import registry

    if os.path.isdir(spec):
        return Path(spec)
    entry = registry.lookup(spec)
    download = {"cache_dir": cache_dir, "force_download": force_download, "token": token}
    if entry is None:
        return download_folder(spec, revision=revision, local_files_only=local_files_only, **download)  # type: ignore[arg-type]
    shipped = entry.folder(registry.SHIPPED_ROOT)
    if entry.is_shipped(registry.SHIPPED_ROOT) and revision is None and not force_download:
        return shipped  # the weights this package ships: no network (a revision asks the hub)
    try:
        return download_folder(entry.repo_id, revision=revision, local_files_only=local_files_only, **download)  # type: ignore[arg-type]
    except ModelNotFoundError as e:
        if entry.is_shipped(registry.SHIPPED_ROOT):
            log.warning("using the shipped copy of %r at %s: the hub could not provide it (%s)", spec, shipped, e)
            return shipped
        raise ModelNotFoundError(
            f"model {spec!r} is registered (hub repo {entry.repo_id}) but its weights are not shipped in "
            f"{shipped} and the hub could not provide them:\n  {e}\n"
            "Train one and ship it: ascl train --config cifar10_resnet18 (or your own config), then "
            f"ascl push runs/<name> --repo-id {entry.repo_id} --dry-run --max-shard-size 16MB --out {shipped}; "
            "or pass a training run folder or checkpoint instead of the name."
        ) from e


def download_folder(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    force_download: bool,
    token: str | bool | None,
    local_files_only: bool,
) -> Path:
    """Download (or find in the cache) the config and weights of a hub repo; the snapshot folder."""
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=LOAD_PATTERNS,
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
    folder = Path(str(path))
    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"hub repo {where} has no {CONFIG_FILE}; it is not a model saved by save_pretrained")
    return folder
