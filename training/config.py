"""Typed training configuration: one dataclass per concern, YAML per experiment, overrides.

Resolution order: dataclass defaults < YAML file (``--config``) < ``--set key=value`` and the
common flags. Unknown keys are an error naming the key, never silently dropped. The resolved
config is written as ``config.yaml`` into the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ascl.errors import AsclError
from ascl.training.augment import AugmentConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FRAMEWORKS = ("moco", "byol")
DEVICES = ("auto", "cpu", "cuda")
SWITCHES = ("auto", "on", "off")
AMPS = ("auto", "bf16", "off")  # no fp16: it would need loss scaling and its host syncs
VIEWS = ("auto", "tensor", "opencv")  # how the fast path makes its two views
# The losses of ascl.training.loss: ascl (soft, adaptive), ahcl (hard neighbours weighted by
# confidence), hard (hard neighbours), none (the framework's plain loss: MoCo's InfoNCE, BYOL's regression).
LOSS_MODES = ("ascl", "ahcl", "hard", "none")


class ConfigError(AsclError, ValueError):
    """A configuration the user can fix; the message names the key or file."""


@dataclass
class DataConfig:
    """What to train on. ``spec``: an image source (``ascl.image_sources``: a folder, cifar10-offline[:PATH],
    imagenette-offline[:PATH], cifar10, cifar100, stl10, digits). ``image_size``: the side of the
    training views and of the encoder's input; ``decode_size``: the side the photos are decoded
    and kept at, from which the random crops are taken (0: ``image_size``; photos: larger, e.g.
    160 for 128-px views, so a crop of the whole photo still has detail to lose)."""

    spec: str = "digits"
    image_size: int = 32
    decode_size: int = 0
    val_fraction: float = 0.1
    subset: int = 0
    num_workers: int = 2


@dataclass
class ModelConfig:
    """Encoder trunk and the training-only heads (heads never ship)."""

    arch: str = "resnet18"
    stem: str = "cifar"
    width: int = 64
    head_hidden: int = 512
    head_dim: int = 128
    pred_hidden: int = 512
    bn_splits: int = 8


@dataclass
class MocoConfig:
    """MoCo-v2: momentum encoder and a queue of past keys."""

    queue_size: int = 4096
    momentum: float = 0.99


@dataclass
class ByolConfig:
    """BYOL: momentum target and a predictor; ASCL neighbours come from the batch."""

    momentum: float = 0.99


@dataclass
class LossConfig:
    """ASCL loss (``mode: none`` is the framework's plain loss)."""

    mode: str = "ascl"
    t1: float = 0.1
    t2: float = 0.05
    n_neighbors: int = 1


@dataclass
class OptimConfig:
    """SGD with linear warm-up then cosine decay, lr scaled by the global batch size."""

    lr_per_256: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0


@dataclass
class EvalConfig:
    """kNN monitor during training (k=200, t=0.1 weighted vote on the val split)."""

    knn_every: int = 10
    knn_k: int = 200
    knn_t: float = 0.1
    knn_train_subset: int = 0
    knn_val_subset: int = 0
    batch_size: int = 512


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is global (split over torchrun processes)."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"
    out: str = ""
    framework: str = "moco"
    epochs: int = 200
    max_steps: int = 0
    batch_size: int = 256
    checkpoint_every: int = 10
    log_every: int = 20
    fast_path: str = "auto"
    compile: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    views: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values that cannot work; returns self."""
        checks: list[tuple[bool, str]] = [
            (self.framework in FRAMEWORKS, f"framework must be one of {FRAMEWORKS}, got {self.framework!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.fast_path in SWITCHES, f"fast_path must be one of {SWITCHES}, got {self.fast_path!r}"),
            (self.amp in AMPS, f"amp must be one of {AMPS}, got {self.amp!r}"),
            (self.views in VIEWS, f"views must be one of {VIEWS}, got {self.views!r}"),
            (self.compile in SWITCHES, f"compile must be one of {SWITCHES} (or true/false), got {self.compile!r}"),
            (self.loss.mode in LOSS_MODES, f"loss.mode must be {'|'.join(LOSS_MODES)}, got {self.loss.mode!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps >= 0, f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (4 <= self.model.width <= 256, f"model.width must be in [4, 256] (64 = torchvision's ResNet), got {self.model.width}"),
            (self.model.bn_splits >= 1, f"model.bn_splits must be >= 1, got {self.model.bn_splits}"),
            (self.moco.queue_size >= 1, f"moco.queue_size must be >= 1, got {self.moco.queue_size}"),
            (0 <= self.moco.momentum < 1 and 0 <= self.byol.momentum < 1, "momentum must be in [0, 1)"),
            (self.data.image_size >= 8, f"data.image_size must be >= 8, got {self.data.image_size}"),
            (self.data.decode_size == 0 or self.data.decode_size >= self.data.image_size,
             f"data.decode_size must be 0 (= image_size) or >= image_size {self.data.image_size}, "
             f"got {self.data.decode_size}"),
            (0 <= self.data.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; give a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")  # type: ignore[arg-type]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' needs a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' needs true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' needs an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' needs a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        if isinstance(value, str | int | float):
            return str(value)
        raise ConfigError(f"config key '{key}' needs a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known keys here: {', '.join(known)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from nested plain data; unknown keys raise ConfigError naming the key."""
    cfg: TrainConfig = _from_dict(TrainConfig, data)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain data (tuples as lists) ready for YAML or a checkpoint."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))  # type: ignore[no-any-return]


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped config (``cifar10_resnet18``, ``digits_tiny``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a shipped config ({', '.join(names)})")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys to values")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as YAML) onto nested plain data in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value, e.g. loss.t2=0.1")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({exc})") from exc
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < ``base`` (e.g. a checkpoint's config) < YAML file < overrides; validated."""
    data: dict[str, Any] = config_to_dict(config_from_dict(base or {}))
    if path:
        file_path = resolve_config_path(path)
        try:
            file_cfg = config_from_dict(read_yaml(file_path))
        except ConfigError as exc:
            raise ConfigError(f"{file_path}: {exc}") from exc
        data = _merge(data, _non_default(config_to_dict(file_cfg), read_yaml(file_path)))
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data).validate()


def _non_default(resolved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The keys present in ``given``, with their resolved (type-checked) values."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(resolved.get(key), dict):
            out[key] = _non_default(resolved[key], value)
        else:
            out[key] = resolved[key]
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: TrainConfig) -> str:
    """YAML text of the resolved config (what ``config.yaml`` in the run folder holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
