"""The precision a server runs its encoder at: fp32, or the calibrated, verified int8 copy.

``ascl serve`` and ``ascl up`` serve at ``--precision`` through ``ascl.serving.online.serve``:
int8 comes from the one export cache (``ascl.export.cache.cached_onnx(ref, precision="int8",
calibration=...)``), quantized once from the fp32 file and refused (PrecisionRefusedError,
exit 2, nothing served) when its recall@10 vs fp32 misses the threshold. The int8 graph
carries the fp32 file's model identity and source revision, so an index built with the fp32
file is served by it unchanged.

The one default calibration rule (``default_calibration``), when ``--calibration`` is not
given: the index's own source images (the source most of its entries came from) when they are
on this machine, else the offline CIFAR-10 copy when it is found, else an error that asks for
``--calibration``.

Only the standard library at import time: the command line reads the help texts from here.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ascl.names import PRECISIONS

__all__ = ["MIN_RECALL_HELP", "PRECISIONS", "PRECISION_HELP", "add_precision_options", "default_calibration",
           "index_sources"]

PRECISION_HELP = ("encoder precision: fp32 (the export as it is) or int8 (calibrated static int8, quantized once "
                  "and cached, verified against fp32 by recall@10 of neighbour lists and refused below "
                  "--min-recall; faster than fp32 on most CPUs, most with VNNI or AMX: see the README's limits)")
MIN_RECALL_HELP = ("int8 is refused (exit 2, nothing served) when it keeps less than this share of each "
                   "verification image's 10 nearest fp32 neighbours")


def add_precision_options(p: argparse.ArgumentParser, calibration_default: str) -> None:
    """``--precision``, ``--calibration`` and ``--min-recall``: the same options for ``ascl serve`` and ``ascl up``."""
    from ascl.image_sources import describe_specs

    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--calibration", default=None, metavar="IMAGES",
                   help=f"int8 calibration and verification images: {describe_specs()}; default: {calibration_default}")
    p.add_argument("--min-recall", type=float, default=0.95, help=MIN_RECALL_HELP)


def index_sources(index_dir: str | Path) -> list[str]:
    """Image-source specs of an index's entries that are on this machine, most entries first."""
    from ascl.image_sources import parse_spec
    from ascl.serving.collections.index import open_index

    counts = Counter(str(m.get("source")) for m in open_index(index_dir).records().values() if m.get("source"))
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
