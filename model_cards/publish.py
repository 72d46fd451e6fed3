"""Publishing: turn a training run (or any encoder) into a hub folder with its card, and upload it.

``save_encoder`` writes a hub folder (config.json, safetensors, the project's README.md card);
``export_folder`` builds the card's facts for a run or model first (``build_facts``) and
``upload`` sends the folder to a Hugging Face Hub. The folder holds the encoder only (the
training wrapper's queue, momentum encoder and heads never leave the run folder), its card,
the training curve and a 2-D map of validation embeddings. Accuracies are measured with
``ascl.model_cards.evaluation`` (the ``ascl eval`` protocol of ``ascl.training.evaluate``) when
labelled data is known; otherwise they are the ones recorded in a JSON run record
(``run.json`` or ``--run-info``), or the last kNN monitor value of the run's ``metrics.csv``.
The card's table says for each number where it came from and on which split.

Errors a user can act on are ``PublishError`` (bad input: exit 2) and ``PublishFailure`` (the
hub refused or failed: exit 1), both ``ascl.errors.AsclError``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub.errors import HfHubHTTPError

from ascl.atomic import atomic_dir
from ascl.errors import FAILURE, AsclError
from ascl.model_cards.card import KNN, LINEAR, CardFacts, Metric, encoder_card
from ascl.model_cards.figures import plot_projection
from ascl.models import resolve_model
from ascl.pretrained import read_json_object
from ascl.training.knn import KNN_K, KNN_T
from ascl.training.metrics import plot_curves, read_metrics
from ascl.weights import DEFAULT_MAX_SHARD_SIZE, save_weights

if TYPE_CHECKING:
    from ascl.encoder import Encoder

CURVE_PNG = "training_curve.png"
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")  # what save_encoder writes
RUN_CURVES_PNG = "curves.png"  # drawn by ascl train in the run folder
PROJECTION_PNG = "embeddings_pca.png"


def knn_name(k: int) -> str:
    """The card's name of a kNN top-1 measured with ``k`` neighbours (``KNN_NAME`` for the protocol's k)."""
    return f"kNN top-1 (k={k}, t={KNN_T})"


KNN_NAME = knn_name(KNN_K)  # the protocol of ascl eval knn

LINEAR_NAME = "linear-probe top-1"
WALL_TIME_COLUMNS = ("wall_time_s", "elapsed_s", "time_s", "elapsed")
# Keys of a JSON run record (run.json, or the time_to_accuracy benchmark's result), first found wins.
INFO_HARDWARE = ("hardware", "device_name", "gpu", "device")
INFO_WALL_TIME = ("wall_time_s", "train_seconds")
INFO_CONFIG = ("config", "recipe")
INFO_CURVE = ("curve_png", "png")
INFO_KNN = ("knn_top1", "final_knn_top1")
INFO_LINEAR = ("linear_top1", "linear_probe_top1")
HUB_DATASETS = {"cifar10": ("CIFAR-10", "cifar10"), "cifar100": ("CIFAR-100", "cifar100"), "stl10": ("STL-10", "stl10")}


class PublishError(AsclError, ValueError):
    """Input publishing cannot use: a repo id, a source model, a run record, a dataset (exit 2)."""


class PublishFailure(AsclError, RuntimeError):
    """Good input, failed operation: the hub refused the upload or failed a request (exit 1)."""

    exit_code = FAILURE


@contextmanager
def _publish_errors(hub_refused: str = "the hub failed a request") -> Iterator[None]:
    """Errors of the layers below as publishing errors, keeping their message: bad input
    (ValueError, LookupError, OSError) -> ``PublishError``; RuntimeError and the hub's HTTP errors
    (told as ``hub_refused: <error>``) -> ``PublishFailure``. An ``AsclError`` passes as it is.
    """
    try:
        yield
    except AsclError:
        raise
    except HfHubHTTPError as e:  # an OSError: before the input errors
        raise PublishFailure(f"{hub_refused}: {e}") from e
    except RuntimeError as e:
        raise PublishFailure(str(e)) from e
    except (ValueError, LookupError, OSError) as e:
        raise PublishError(str(e)) from e


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is ``USER/NAME``, else a ``PublishError``; returns NAME."""
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo-id must be USER/NAME, got {repo_id!r}")
    return repo_id.split("/")[1]


def save_encoder(
    encoder: Encoder,
    folder: str | Path,
    *,
    facts: CardFacts | None = None,
    extra_files: Mapping[str, Path] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a hub folder: config.json, safetensors (sharded above ``max_shard_size``), README.md.

    The card is the project's (``ascl.model_cards.card.encoder_card``), rendered from ``facts``
    (``CardFacts``; the encoder's own config when None) by this module, whatever card the
    mixin's ``save_pretrained`` writes. ``extra_files`` (name in the folder -> source path),
    e.g. the card's plots, are copied in. The folder is replaced as a whole or not at all.
    """
    folder = Path(folder)
    card = encoder_card(encoder, facts)
    with atomic_dir(folder) as tmp:
        for name, source in (extra_files or {}).items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise PublishError(f"extra file name {name!r} must be relative to the hub folder")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        encoder.save_pretrained(tmp)  # the mixin: config.json and the weights (one file)
        save_weights(encoder, tmp, max_shard_size=max_shard_size)  # the weights as asked: replaces that file
        card.save(tmp / "README.md")  # after save_pretrained: the project's card is the one that ships
    return folder


@dataclass
class Source:
    """An encoder and where it came from (a run folder has the recipe and metrics)."""

    encoder: Encoder
    run_dir: Path | None


def open_source(spec: str, *, revision: str | None = None) -> Source:
    """The encoder of ``spec`` (``ascl.models.resolve_model``) and its run folder, when it came from one."""
    ref = resolve_model(spec, revision=revision)
    return Source(ref.load_encoder(), ref.run_folder)


def _last_float(rows: list[dict[str, str]], columns: tuple[str, ...] | list[str]) -> tuple[str, float] | None:
    for row in reversed(rows):
        for c in columns:
            try:
                return c, float(row[c])
            except (KeyError, TypeError, ValueError):
                continue
    return None


def _dataset_of(training_config: dict[str, Any] | None) -> tuple[str, str] | None:
    """(pretty name, hub dataset id or 'imagefolder') of the run's ``data.spec``."""
    data = (training_config or {}).get("data")
    spec = str(data.get("spec", "")) if isinstance(data, dict) else ""
    if not spec:
        return None
    key = spec.split(":")[0].removesuffix("-offline")
    return HUB_DATASETS.get(key, (Path(spec).name or spec, "imagefolder"))


def _run_facts(facts: CardFacts, run_dir: Path, figures: Path) -> tuple[list[dict[str, str]], dict[str, Path]]:
    """Fill recipe, data, hardware and wall time from a run folder; find or plot its curve."""
    extra: dict[str, Path] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        facts.training_config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or None
    dataset = _dataset_of(facts.training_config)
    if dataset is not None:
        facts.training_data = dataset[0]
        facts.datasets = [dataset[1]] if dataset[1] != "imagefolder" else []
    if (run_dir / "run.json").is_file():
        apply_run_info(facts, run_dir / "run.json", extra)
    rows = read_metrics(run_dir / "metrics.csv")
    if facts.wall_time_s is None and (wall := _last_float(rows, WALL_TIME_COLUMNS)) is not None:
        facts.wall_time_s = wall[1]
    if (run_dir / RUN_CURVES_PNG).is_file():  # the curves 'ascl train' drew itself
        extra[CURVE_PNG] = run_dir / RUN_CURVES_PNG
    elif plot_curves(rows, figures / CURVE_PNG, title=f"{facts.model_name}: training") is not None:
        extra[CURVE_PNG] = figures / CURVE_PNG
    if CURVE_PNG in extra:
        facts.curve_png = CURVE_PNG
    return rows, extra


def _first(info: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((info[k] for k in keys if info.get(k) not in (None, "")), None)


def apply_run_info(facts: CardFacts, path: Path, extra: dict[str, Path]) -> None:
    """Fill facts the card lacks from a JSON record of the run (``run.json``, or the JSON of
    ``benchmarks/time_to_accuracy.py``): hardware, wall time, recipe, curve PNG and recorded
    kNN / linear-probe accuracies (percent). Facts given on the command line win.
    """
    info = read_json_object(path, PublishError, "run facts (a run record)")
    facts.hardware = facts.hardware or (str(h) if (h := _first(info, INFO_HARDWARE)) else None)
    if facts.wall_time_s is None and isinstance(w := _first(info, INFO_WALL_TIME), int | float):
        facts.wall_time_s = float(w)
    recipe = _first(info, INFO_CONFIG)
    if facts.training_config is None and isinstance(recipe, dict):
        facts.training_config = recipe
        spec = recipe.get("data")
        dataset = _dataset_of({"data": {"spec": spec}} if isinstance(spec, str) else recipe)
        if dataset is not None:
            facts.training_data = dataset[0]
            facts.datasets = [dataset[1]] if dataset[1] != "imagefolder" else []
    png = _first(info, INFO_CURVE)
    if CURVE_PNG not in extra and isinstance(png, str) and (path.parent / png).is_file():
        extra[CURVE_PNG] = path.parent / png
        facts.curve_png = CURVE_PNG
    split = str(_first(info, ("val_split",)) or _first(recipe if isinstance(recipe, dict) else {}, ("val_split",))
                or "the run's val split")
    dataset_name = facts.training_data or "training data"
    recorded = [
        Metric(protocol, metric_name, float(value), dataset_name, (facts.datasets or ["imagefolder"])[0], split,
               f"recorded in {path.name}")
        for protocol, metric_name, keys in ((KNN, KNN_NAME, INFO_KNN), (LINEAR, LINEAR_NAME, INFO_LINEAR))
        if isinstance(value := _first(info, keys), int | float)
    ]
    if recorded and not facts.metrics:
        facts.metrics = recorded


def _recorded_knn(facts: CardFacts, rows: list[dict[str, str]]) -> Metric | None:
    """The last kNN accuracy the training monitor wrote to metrics.csv, if any."""
    columns = [c for c in (rows[0] if rows else {}) if "knn" in c.lower()]
    found = _last_float(rows, columns)
    if found is None:
        return None
    value = found[1] * 100.0 if found[1] <= 1.0 else found[1]
    val_fraction = _run_data(facts).get("val_fraction")
    split = "the run's val split" + (f" (data.val_fraction={val_fraction})" if val_fraction else "")
    monitor = (facts.training_config or {}).get("eval")
    k = int(monitor.get("knn_k", KNN_K)) if isinstance(monitor, dict) else KNN_K  # the vote the monitor used
    return Metric(KNN, knn_name(k), value, facts.training_data or "training data", "imagefolder", split,
                  "recorded by the training kNN monitor (metrics.csv)")


def _run_data(facts: CardFacts) -> dict[str, Any]:
    data = (facts.training_config or {}).get("data")
    return data if isinstance(data, dict) else {}


@dataclass
class EvalRequest:
    """What to measure for the card: a dataset spec (None: the run's own data), or nothing."""

    data: str | None = None
    val_fraction: float | None = None  # None: the run's data.val_fraction, else 0.1
    subset: int = 0
    device: str = "auto"
    enabled: bool = True


def build_facts(
    source: Source, figures: Path, *, name: str, repo_id: str | None, evaluation: EvalRequest | None = None,
    hardware: str | None = None, wall_time_s: float | None = None, run_info: Path | None = None,
    commands: list[str] | None = None,
) -> tuple[CardFacts, dict[str, Path]]:
    """Card facts and the figure files (written under ``figures``) for ``source``.

    Accuracies: measured now when labelled data is known (``evaluation``), else those recorded
    in ``run_info`` / the run's ``run.json``, else the last kNN of the run's ``metrics.csv``.
    """
    enc = source.encoder
    facts = CardFacts(model_name=name, encoder_config=dict(enc.config()), embedding_dim=enc.embedding_dim,
                      repo_id=repo_id, hardware=hardware, wall_time_s=wall_time_s, commands=list(commands or []))
    rows: list[dict[str, str]] = []
    extra: dict[str, Path] = {}
    if run_info is not None:
        apply_run_info(facts, run_info, extra)
    if source.run_dir is not None:
        rows, run_extra = _run_facts(facts, source.run_dir, figures)
        extra = {**run_extra, **extra}
    recorded = list(facts.metrics)
    req = evaluation or EvalRequest()
    spec = req.data or _run_data(facts).get("spec")
    if req.enabled and spec:
        from ascl.model_cards.evaluation import evaluate

        val_fraction = req.val_fraction if req.val_fraction is not None else float(_run_data(facts).get("val_fraction", 0.1))
        ev = evaluate(enc, str(spec), val_fraction=val_fraction, subset=req.subset, device=req.device)
        dataset, dataset_type = _dataset_of({"data": {"spec": str(spec)}}) or (str(spec), "imagefolder")
        how = "measured by ascl push with the ascl eval protocol"
        facts.metrics = [  # measured now: replaces any recorded numbers
            *(Metric(KNN, knn_name(k), value, dataset, dataset_type, ev.split, how) for k, value in ev.knn_by_k.items()),
            Metric(LINEAR, LINEAR_NAME, ev.linear_top1, dataset, dataset_type, ev.split, how),
        ]
        plot_projection(ev.val_embeddings, ev.val_labels, ev.classes, figures / PROJECTION_PNG,
                        title=f"{name}: validation embeddings (PCA)")
        extra[PROJECTION_PNG] = figures / PROJECTION_PNG
        facts.projection_png = PROJECTION_PNG
    elif not recorded and (knn := _recorded_knn(facts, rows)) is not None:
        facts.metrics = [knn]
    return facts, extra


def export_folder(
    spec: str,
    out: Path,
    *,
    repo_id: str | None,
    name: str | None = None,
    revision: str | None = None,
    evaluation: EvalRequest | None = None,
    hardware: str | None = None,
    wall_time_s: float | None = None,
    run_info: Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    commands: list[str] | None = None,
) -> tuple[Path, CardFacts]:
    """Write the hub folder for ``spec`` into ``out`` (atomically); returns it and its card facts.

    Raises ``PublishError`` for input it cannot use (the message of the error below it),
    ``PublishFailure`` when the hub or the evaluation failed.
    """
    with _publish_errors():
        source = open_source(spec, revision=revision)
        model_name = name or (repo_id.split("/")[-1] if repo_id else f"ascl-{source.encoder.arch}")
        with tempfile.TemporaryDirectory(prefix="ascl-card-") as tmp:
            facts, extra = build_facts(source, Path(tmp), name=model_name, repo_id=repo_id, evaluation=evaluation,
                                       hardware=hardware, wall_time_s=wall_time_s, run_info=run_info,
                                       commands=commands)
            save_encoder(source.encoder.cpu(), out, facts=facts, extra_files=extra, max_shard_size=max_shard_size)
    return out, facts


def upload(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           token: str | None = None) -> str:
    """Create the repo if needed (and the branch ``revision``), upload ``folder``; the commit URL.

    A repo id that is not USER/NAME is a ``PublishError``; an upload the hub refuses (or a
    request it fails) is a ``PublishFailure``.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    with _publish_errors("the hub refused the upload"):
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=f"Upload {repo.repo_id} with ascl push",
            # weights of an earlier push that this one does not replace (other shards, an old index)
            # would mix with the new ones on download: the commit deletes them
            delete_patterns=list(WEIGHT_FILE_PATTERNS),
        )
    return str(info.commit_url)
