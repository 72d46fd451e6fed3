"""An int8 copy of an fp32 ONNX export, calibrated, verified against fp32, and refused when it loses too much.

``int8_from_onnx`` is what the export cache (``ascl.export.cache``) runs for ``ascl serve/up
--precision int8``: the same quantization as ``ascl export onnx --int8``
(``ascl.export.quantize.quantize_int8``: static QDQ, per-channel) and the same verdict
(``ascl.export.parity.compare``: recall@10 of neighbour lists vs fp32), with the fp32 ONNX graph
itself as the reference. It matches eager PyTorch to cosine 0.9999 (checked when it was
exported), so any fp32 export can be quantized, also one whose PyTorch weights are not on this
machine; and no torch is loaded.

The int8 graph keeps the fp32 file's metadata (model name, arch, dims, source revision: the
same model, so its embeddings are comparable with an index built by the fp32 file), with
``ascl.precision`` set to ``int8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ascl.atomic import atomic_path
from ascl.errors import USAGE, AsclError
from ascl.export.image_sets import ImageSet
from ascl.export.parity import MIN_RECALL_AT_10, ParityReport, compare, embed_in_batches
from ascl.export.runtime import OnnxEmbedder
from ascl.names import PRECISION_KEY


class PrecisionRefusedError(AsclError, ValueError):
    """A reduced-precision graph that keeps too little of fp32's neighbour lists to be served.

    A usage error (exit 2): the user calibrates on other images, accepts less (``--min-recall``)
    or serves fp32; nothing was written or served. ``reports`` holds the measurement."""

    exit_code = USAGE

    def __init__(self, message: str, reports: Sequence[ParityReport]) -> None:
        super().__init__(message)
        self.reports = list(reports)


def refusal_message(recall: float, threshold: float, where: str) -> str:
    """The one text of a refusal: the measured recall, the threshold, and what to do."""
    return (f"int8 refused, nothing served: recall@10 vs fp32 {recall:.4f} is below the threshold {threshold} "
            f"{where}. Serve fp32 (--precision fp32), calibrate on images like the gallery's (--calibration "
            "IMAGES), or accept less with --min-recall.")


def int8_from_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: ImageSet,
    verification: ImageSet,
    *,
    min_recall: float | None = None,
    calibration_method: str = "minmax",
    threads: int = 0,
) -> ParityReport:
    """Quantize ``fp32_path`` (calibrated on ``calibration``), verify the result against it on
    ``verification`` and write it to ``out_path`` only when recall@10 vs fp32 reaches
    ``min_recall`` (default ``MIN_RECALL_AT_10["int8"]``, 0.95); PrecisionRefusedError otherwise."""
    import onnx

    from ascl.export.onnx_export import read_metadata
    from ascl.export.quantize import quantize_int8

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    fp32 = onnx.load_model(fp32_path)
    model = quantize_int8(fp32, calibration.images, method=calibration_method)
    props = {**read_metadata(fp32), PRECISION_KEY: "int8"}
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    reference = embed_in_batches(OnnxEmbedder(fp32_path, providers=["CPUExecutionProvider"], threads=threads).embed,
                                 verification.images, 64)  # [N, D]
    threshold = MIN_RECALL_AT_10["int8"] if min_recall is None else min_recall
    with atomic_path(out_path) as tmp:
        onnx.save_model(model, tmp)
        candidate = OnnxEmbedder(tmp, providers=["CPUExecutionProvider"], threads=threads)
        report = compare(reference, candidate.embed, verification.images, precision="int8",
                         source=verification.source, labels=verification.labels, min_recall=threshold)
        if not report.passed:
            where = (f"on {report.images} verification images ({verification.source}; calibrated on "
                     f"{len(calibration)} images of {calibration.source})")
            recall = report.recall_at_10 or 0.0
            message = (refusal_message(recall, threshold, where) if recall < threshold else
                       f"int8 refused, nothing served: {'; '.join(report.problems)} {where}")  # NaN or inf
            raise PrecisionRefusedError(message, [report])
    return report
