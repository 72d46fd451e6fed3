"""Export with verification: fp32 (+ fp16, int8) ONNX files that are checked before they land.

Everything is built in a hidden folder inside the output folder, verified against eager
PyTorch on real images, and only then moved into place (one ``os.replace`` per file; variants
an earlier export left there are removed), with an ``export.json`` that records what was measured. A model that misses its tolerance is not
written unless ``force`` is set; on any error nothing new is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ascl import __version__
from ascl.atomic import atomic_write_text
from ascl.digest import file_digest
from ascl.errors import FAILURE, AsclError
from ascl.export.identity import ModelMismatchError, differences
from ascl.export.image_sets import ImageSet
from ascl.export.onnx_export import metadata_props, read_metadata
from ascl.export.parity import ParityReport, compare
from ascl.export.runtime import OnnxEmbedder, ProviderSpec
from ascl.names import PRECISION_KEY, SOURCE_REVISION_KEY, STRUCTURE_KEYS

if TYPE_CHECKING:
    from ascl.encoder import Encoder

FILE_NAMES = {"fp32": "encoder.onnx", "fp16": "encoder_fp16.onnx", "int8": "encoder_int8.onnx"}
REPORT_NAME = "export.json"
DEFAULT_BATCH_SIZES = (1, 64)


class ParityError(AsclError, RuntimeError):
    """An exported model missed its tolerance; ``reports`` holds the measurements."""

    exit_code = FAILURE

    def __init__(self, message: str, reports: Sequence[ParityReport]) -> None:
        super().__init__(message)
        self.reports = list(reports)


class OutputError(AsclError, OSError):
    """The output folder cannot be created or written (the user picks another: a usage error)."""


@dataclass
class LoadedModel:
    """What an export needs of a model: the encoder, and the facts stamped into the graph."""

    encoder: Encoder
    name: str  # stored as ascl.model_name
    revision: str  # stored as ascl.source_revision: hub revision, or a content hash of the weights


@dataclass
class ExportResult:
    files: dict[str, Path]  # precision -> written file
    reports: list[ParityReport] = field(default_factory=list)
    report_path: Path | None = None


def reference_embeddings(encoder: Encoder, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Eager PyTorch fp32 embeddings, the ground truth. uint8 [N, S, S, 3] -> float32 [N, D]."""
    import torch

    encoder.eval()
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))  # [B, S, S, 3]
            chunks.append(encoder.embed_uint8(x).float().numpy())  # [B, D]
    return np.concatenate(chunks)


def check_exported_from(path: str | os.PathLike[str], metadata: dict[str, str], encoder: Encoder) -> None:
    """ModelMismatchError unless the ONNX metadata describes ``encoder`` (arch, stem, dim, size, mean/std)."""
    if not any(key.startswith("ascl.") for key in metadata):
        raise ModelMismatchError(f"{path}: has no ascl metadata; export it with 'ascl export onnx MODEL --out DIR'")
    expected = metadata_props(encoder, "", "")
    diffs = [f"{key.removeprefix('ascl.')} {metadata.get(key)!r} in the file vs {expected[key]!r} in the model"
             for key in differences(metadata, expected, STRUCTURE_KEYS)]
    if diffs:
        raise ModelMismatchError(
            f"{path} was exported from a different model: " + "; ".join(diffs)
            + ". Pass the MODEL it came from, or re-export with 'ascl export onnx'."
        )


def verify_file(
    onnx_path: str | Path,
    encoder: Encoder,
    gallery: ImageSet,
    *,
    reference: np.ndarray | None = None,
    providers: Sequence[ProviderSpec] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_recall: float | None = None,
    threads: int = 0,
) -> ParityReport:
    """ONNX Runtime on ``onnx_path`` vs eager ``encoder`` on ``gallery`` (see parity.compare).

    Raises ModelMismatchError when the file's metadata names another model.
    """
    path = Path(onnx_path)
    embedder = OnnxEmbedder(path, providers=providers or ["CPUExecutionProvider"], threads=threads)
    check_exported_from(path, embedder.metadata, encoder)
    if gallery.images.shape[1] != embedder.image_size:
        raise ValueError(f"gallery images are {gallery.images.shape[1]} px, the model takes {embedder.image_size} px")
    ref = reference_embeddings(encoder, gallery.images) if reference is None else reference
    report = compare(
        ref, embedder.embed, gallery.images, precision=embedder.precision, source=gallery.source,
        labels=gallery.labels, batch_sizes=batch_sizes, min_recall=min_recall,
    )
    if not report.passed and embedder.precision == "fp32":
        report.problems.append(
            f"weights differ? file source revision {embedder.metadata.get(SOURCE_REVISION_KEY)!r}; "
            "was this file exported from this MODEL?"
        )
    return report


def prepare_output(out_dir: Path) -> tuple[Path, bool]:
    """Create ``out_dir`` if needed and a hidden work folder inside it; OutputError if impossible.

    Returns (work folder, whether out_dir was created here)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".export-", suffix=".tmp", dir=out_dir))
    except OSError as exc:
        raise OutputError(
            f"{out_dir}: cannot write the export there ({exc.strerror or exc}); choose a writable --out folder"
        ) from exc
    return work, created




def _build(
    loaded: LoadedModel, work: Path, *, opset: int, fp16: bool, int8: ImageSet | None, calibration_method: str
) -> dict[str, Path]:
    """Write the fp32 (and fp16 / int8) graphs into ``work``; returns precision -> path."""
    import onnx

    from ascl.export.onnx_export import encoder_to_onnx, set_metadata

    fp32 = encoder_to_onnx(loaded.encoder, opset=opset, model_name=loaded.name, source_revision=loaded.revision)
    files = {"fp32": work / FILE_NAMES["fp32"]}
    onnx.save_model(fp32, files["fp32"])
    variants: dict[str, onnx.ModelProto] = {}
    if fp16:
        from ascl.export.fp16 import to_fp16

        variants["fp16"] = to_fp16(fp32)
    if int8 is not None:
        from ascl.export.quantize import quantize_int8

        variants["int8"] = quantize_int8(fp32, int8.images, method=calibration_method)
    for precision, model in variants.items():
        set_metadata(model, {**read_metadata(fp32), PRECISION_KEY: precision})
        onnx.checker.check_model(model, full_check=True)
        files[precision] = work / FILE_NAMES[precision]
        onnx.save_model(model, files[precision])
    return files


def export_model(
    loaded: LoadedModel,
    out_dir: str | Path,
    gallery: ImageSet,
    *,
    opset: int = 17,
    fp16: bool = False,
    calibration: ImageSet | None = None,
    calibration_method: str = "minmax",
    force: bool = False,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    min_recall: float | None = None,
) -> ExportResult:
    """Export ``loaded`` to ``out_dir`` (fp32, + fp16 if asked, + int8 when ``calibration`` is
    given), verify every file on ``gallery`` and move them in. Raises ParityError (nothing
    written) when a file misses its tolerance and ``force`` is False."""
    out_dir = Path(out_dir)
    work, created = prepare_output(out_dir)
    try:
        files = _build(loaded, work, opset=opset, fp16=fp16, int8=calibration, calibration_method=calibration_method)
        reference = reference_embeddings(loaded.encoder, gallery.images)
        reports = [
            verify_file(path, loaded.encoder, gallery, reference=reference, batch_sizes=batch_sizes,
                        min_recall=min_recall)
            for path in files.values()
        ]
        failed = [r for r in reports if not r.passed]
        if failed and not force:
            raise ParityError(
                "export refused, nothing written: " + "; ".join(r.summary() for r in failed)
                + ". Use --force to write it anyway.", reports,
            )
        final = {precision: out_dir / path.name for precision, path in files.items()}
        for precision, path in files.items():
            os.replace(path, final[precision])
        for precision, name in FILE_NAMES.items():  # a variant from an earlier export would not match
            if precision not in final:
                (out_dir / name).unlink(missing_ok=True)
        report_path = out_dir / REPORT_NAME
        atomic_write_text(report_path, json.dumps(_report(loaded, final, reports, calibration, force), indent=2))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return ExportResult(final, reports, report_path)


def _report(
    loaded: LoadedModel, files: dict[str, Path], reports: list[ParityReport], calibration: ImageSet | None,
    forced: bool,
) -> dict[str, object]:
    import onnxruntime
    import torch

    return {
        "model": loaded.name,
        "source_revision": loaded.revision,
        "config": loaded.encoder.config(),
        "files": {p: {"name": f.name, "bytes": f.stat().st_size, "sha256": file_digest(f)} for p, f in files.items()},
        "parity": [r.to_dict() for r in reports],
        "forced": forced,
        "calibration": None if calibration is None else {"source": calibration.source, "images": len(calibration)},
        "command": " ".join(sys.argv),
        "versions": {"ascl-hub": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
