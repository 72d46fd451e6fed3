"""Which encoder file a server runs: the fp32 export, or its calibrated, verified int8 copy.

``served_onnx`` is what ``ascl serve --precision`` calls (and, through ``ascl.serving.gallery``,
``ascl up``): fp32 is the file as it is; int8 comes from the one export cache
(``ascl.export.cache.cached_onnx(ref, precision="int8", calibration=...)``), quantized once from
that same fp32 file and refused (PrecisionRefusedError, exit 2, nothing served) when its
recall@10 vs fp32 misses the threshold. The int8 graph carries the fp32 file's model identity
and source revision, so an index built with the fp32 file is served by it unchanged.

Calibration images, when none are given: the index's own source images (the source most of
its entries came from) when they are on this machine, else the offline CIFAR-10 copy when it
is found, else an error that asks for ``--calibration``.

Only the standard library at import time: the command line reads the help texts from here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ascl.names import PRECISIONS

PRECISION_HELP = ("encoder precision: fp32 (the export as it is) or int8 (calibrated static int8, quantized once "
                  "and cached, verified against fp32 by recall@10 of neighbour lists and refused below "
                  "--min-recall; faster than fp32 on most CPUs, most with VNNI or AMX: see the README's limits)")
MIN_RECALL_HELP = ("int8 is refused (exit 2, nothing served) when it keeps less than this share of each "
                   "verification image's 10 nearest fp32 neighbours")


@dataclass(frozen=True)
class ServedModel:
    """The ONNX file a server runs, its precision and one line for the screen."""

    onnx: Path
    precision: str
    description: str
    made_now: bool = False


def index_sources(index_dir: str | Path) -> list[str]:
    """Image-source specs of an index's entries that are on this machine, most entries first."""
    from ascl.image_sources import parse_spec
    from ascl.serving.index import GalleryIndex

    counts = Counter(str(m.get("source")) for m in GalleryIndex.load(index_dir).metadata.values() if m.get("source"))
    found = []
    for source, _ in counts.most_common():
        try:
            parse_spec(source)  # a folder, list file or archive that still exists; a set name
        except (OSError, ValueError):
            continue
        found.append(source)
    return found


def default_calibration(index_dir: str | Path | None) -> str:
    """The calibration images when ``--calibration`` is not given (see the module doc)."""
    from ascl.export.cache import CalibrationNeededError
    from ascl.image_sources import default_cifar_tar

    sources = index_sources(index_dir) if index_dir is not None else []
    if sources:
        return sources[0]
    tar = default_cifar_tar()
    if tar is not None:
        return f"cifar10-offline:{tar}"
    where = f"the images of {index_dir} are not on this machine and " if index_dir is not None else ""
    raise CalibrationNeededError(
        f"--precision int8 needs calibration images: {where}no CIFAR-10 copy was found; pass --calibration IMAGES "
        "(a few hundred images like the gallery's: a folder, a list file, a .tar.gz or cifar10-offline:PATH)"
    )


def served_onnx(fp32_onnx: str | Path, precision: str = "fp32", *, calibration: str | None = None,
                min_recall: float | None = None, index_dir: str | Path | None = None,
                cache: str | Path | None = None, refresh: bool = False) -> ServedModel:
    """The file to serve for the fp32 export ``fp32_onnx`` at ``precision`` (int8: cached, verified)."""
    from ascl.export.cache import cached_onnx, describe_int8
    from ascl.models import resolve_model

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    fp32_onnx = Path(fp32_onnx)
    if precision == "fp32":
        return ServedModel(fp32_onnx, "fp32", f"fp32 ({fp32_onnx})")
    source = calibration or default_calibration(index_dir)
    path, made = cached_onnx(resolve_model(str(fp32_onnx)), cache=cache, refresh=refresh, precision="int8",
                             calibration=source, min_recall=min_recall)
    return ServedModel(path, "int8", describe_int8(path, made, min_recall), made)
