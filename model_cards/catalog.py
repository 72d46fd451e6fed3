"""Which encoders this machine has: the shipped ones and those in the Hugging Face cache.

``ascl models`` prints this catalogue; ``ascl models --path NAME`` prints one model's folder.
Facts come from each folder's own files: ``config.json`` (arch, width), the card's
``model-index`` metadata (kNN top-1), the files' sizes. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ascl import registry

CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class ModelEntry:
    """One model folder on this machine."""

    name: str  # registered name, or the repo id of a cached repo
    source: str  # "shipped" | "cache"
    path: Path
    arch: str
    width: int
    embedding_dim: int
    image_size: int  # the side its input images are resized to
    use: str  # what it is for (the registry's words; empty for unregistered models)
    knn_top1: float | None  # percent, from the card; None when the card has none
    size_bytes: int
    is_default: bool


def folder_size(folder: Path) -> int:
    """Bytes of the files in ``folder`` (symbolic links into the hub's blob store followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def card_knn_top1(folder: Path) -> float | None:
    """The kNN top-1 (%) in the card's model-index metadata, if the folder has a card with one."""
    card = folder / CARD_FILE
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        results = ModelCard.load(card).data.eval_results or []
    except (ValueError, OSError):
        return None
    for result in results:
        if str(result.metric_name).startswith("kNN"):
            return float(result.metric_value)
    return None


def read_entry(name: str, source: str, folder: Path) -> ModelEntry | None:
    """A ``ModelEntry`` for an encoder folder; None when the folder holds no encoder config."""
    from ascl.encoder import ARCHS, TORCHVISION_WIDTH, embedding_dim_of

    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("arch") not in ARCHS:
        return None
    width = int(config.get("width", TORCHVISION_WIDTH))
    default = registry.lookup(registry.DEFAULT_ALIAS)
    known = registry.lookup(name)
    return ModelEntry(
        name=name, source=source, path=folder, arch=str(config["arch"]), width=width,
        embedding_dim=embedding_dim_of(str(config["arch"]), width), image_size=int(config.get("image_size", 0)),
        use=known.use if known is not None else "", knn_top1=card_knn_top1(folder),
        size_bytes=folder_size(folder), is_default=default is not None and default.name == name,
    )


def shipped_models() -> list[ModelEntry]:
    """Registered models whose weights are shipped with the package."""
    entries = []
    for model in registry.MODELS.values():
        if model.is_shipped(registry.SHIPPED_ROOT):
            entry = read_entry(model.name, "shipped", model.folder(registry.SHIPPED_ROOT))
            if entry is not None:
                entries.append(entry)
    return entries


def cached_models(cache_dir: str | Path | None = None) -> list[ModelEntry]:
    """Encoders in the Hugging Face cache (newest snapshot of each model repo)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)  # HF_HOME / HF_HUB_CACHE, read now
    except CacheNotFound:
        return []
    names = {m.repo_id: m.name for m in registry.MODELS.values()}
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        entry = read_entry(names.get(repo.repo_id, repo.repo_id), "cache", Path(newest.snapshot_path))
        if entry is not None:
            entries.append(entry)
    return entries


def all_models(cache_dir: str | Path | None = None) -> list[ModelEntry]:
    """Shipped models first, then cached ones."""
    return shipped_models() + cached_models(cache_dir)


def model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of ``name`` (a registered name, ``default``, or a cached repo id).

    Raises LookupError saying how to get the model when this machine does not have it.
    """
    wanted = registry.resolve_name(name)
    entry = registry.lookup(name)
    for model in all_models(cache_dir):
        if model.name == wanted or (entry is not None and model.name == entry.name):
            return model.path
    alias = f" (the default model is {wanted})" if name == registry.DEFAULT_ALIAS else ""
    repo = entry.repo_id if entry is not None else name
    raise LookupError(
        f"model {name!r}{alias} is neither shipped with this package nor in the local Hugging Face cache; "
        f"download it with 'ascl pull {repo}', or list what is here with 'ascl models'"
    )


def format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"


def format_table(entries: list[ModelEntry]) -> str:
    """The ``ascl models`` table: one row per model, the default marked with ``*``."""
    header = ("", "name", "arch", "width", "dim", "input", "kNN top-1", "size", "source", "for", "path")
    rows = [header] + [
        ("*" if e.is_default else "", e.name, e.arch, str(e.width), str(e.embedding_dim),
         f"{e.image_size} px" if e.image_size else "-", f"{e.knn_top1:.2f}%" if e.knn_top1 is not None else "-",
         format_size(e.size_bytes), e.source, e.use or "-", str(e.path))
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
