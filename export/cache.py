"""The one cache of ONNX exports, keyed by the content of the weights (and, for int8, the calibration).

``cached_onnx(ref)`` gives the ONNX file of any resolved model (``ascl.models.ModelRef``): an
``.onnx`` spec as it is; anything else exported once into
``<cache>/models/<content key>/encoder.onnx``. The key is a hash of the weight bytes, so a
retrained checkpoint is exported again and an unchanged one never is, wherever it lives. The
export is ``ascl export onnx``'s (``ascl.export.pipeline.export_model``): built in a hidden
folder, checked against eager PyTorch on real images (``VERIFY_IMAGES`` of the CIFAR-10 copy when
one is found, else synthetic ones) and only then moved in, so an interrupted or failed export
leaves no file that a later start would trust (ParityError, exit 1). ``model.json`` records the
parity report; a file cached before exports were checked is checked before its first use (and
exported again if it fails). ``ascl serve``, ``ascl index``, ``ascl embed``, ``ascl dedup`` and
``ascl up`` share it.

``cached_onnx(ref, precision="int8", calibration=IMAGES)`` gives the calibrated int8 graph of
the same model: quantized from the fp32 file above (``ascl.export.int8.int8_from_onnx``: the
quantization and parity check of ``ascl export onnx --int8``),
verified against it (recall@10 of neighbour lists on a verification sample) and kept only when
it passes, in ``<cache>/models/<content key>/int8-<calibration key>/encoder.onnx`` with a
``model.json`` that records what was measured. The calibration key hashes the image source
(its kind, where it is, and a fingerprint: names, sizes and modification times of a folder's
images; size and time of an archive) and the sample sizes, so new calibration images make a
new int8 file and the same ones find the old. An fp32 ``.onnx`` that this cache wrote (what an
index manifest names) is keyed like the model it came from, so ``ascl up`` (which starts from
the weights) and ``ascl serve`` (which starts from the index's ONNX file) find the same int8 file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ascl.atomic import atomic_dir, atomic_write_text
from ascl.cache import cache_dir
from ascl.digest import file_digest
from ascl.errors import AsclError
from ascl.export.runtime import onnx_facts
from ascl.models import ModelRef
from ascl.names import PRECISIONS

ONNX_NAME = "encoder.onnx"
RECORD_NAME = "model.json"
CALIBRATION_IMAGES = 256  # what `ascl export onnx --int8` calibrates on by default
VERIFY_IMAGES = 256  # what `ascl export onnx` verifies an fp32 export on by default
VERIFICATION_IMAGES = 500  # recall@10 vs fp32 is measured on these (disjoint from calibration when the source allows)
MIN_DISJOINT_VERIFICATION = 200  # fewer left after calibration: verify on every image (overlapping)


class CalibrationNeededError(AsclError, ValueError):
    """int8 was asked for without calibration images (or with a source that holds none)."""


def export_folder(ref: ModelRef, cache: str | Path | None = None) -> Path:
    """Where the export of ``ref`` lives (or will live) in the cache."""
    return cache_dir(cache) / "models" / ref.content_key


def export_record(onnx_path: str | Path) -> dict[str, Any] | None:
    """The ``model.json`` this cache wrote beside ``onnx_path`` (None for files it did not write)."""
    path = Path(onnx_path).parent / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def cached_onnx(
    ref: ModelRef, *, cache: str | Path | None = None, refresh: bool = False, precision: str = "fp32",
    calibration: str | Path | None = None, min_recall: float | None = None,
) -> tuple[Path, bool]:
    """(the ONNX file of ``ref`` at ``precision``, whether it was made just now); ``refresh`` makes it again.

    ``precision="int8"`` needs ``calibration`` (any ``ascl.image_sources`` spec) unless ``ref`` is
    an int8 ``.onnx`` file already; the int8 file is refused (PrecisionRefusedError, exit 2,
    nothing written) when its recall@10 vs fp32 is below ``min_recall`` (default 0.95), also
    when a cached one measured less than a ``min_recall`` asked for now.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    fp32, exported = _cached_fp32(ref, cache=cache, refresh=refresh)
    if precision == "fp32":
        return fp32, exported
    return _cached_int8(ref, fp32, cache=cache, refresh=refresh, calibration=calibration, min_recall=min_recall)


def _cached_fp32(ref: ModelRef, *, cache: str | Path | None, refresh: bool) -> tuple[Path, bool]:
    """The verified fp32 export of ``ref`` (an ``.onnx`` spec: the file as it is; no weights to check it on)."""
    if ref.onnx_path is not None:
        return ref.onnx_path, False
    folder = export_folder(ref, cache)
    onnx_path = folder / ONNX_NAME
    record = export_record(onnx_path) if onnx_path.is_file() else None
    if record is not None and not refresh and record.get("parity", {}).get("passed"):
        return onnx_path, False
    from ascl.export.image_sets import verification_set
    from ascl.export.pipeline import LoadedModel, export_model, verify_file

    loaded = LoadedModel(ref.load_encoder().eval(), ref.name, ref.source_revision)
    gallery = verification_set(loaded.encoder.image_size, VERIFY_IMAGES)
    if record is not None and not refresh:  # cached before exports were checked: check it before its first use
        report = verify_file(onnx_path, loaded.encoder, gallery)
        if report.passed:
            _write_fp32_record(folder, ref, report)
            return onnx_path, False
    result = export_model(loaded, folder, gallery)  # checked before it lands; ParityError: nothing written
    _write_fp32_record(folder, ref, result.reports[0])
    return onnx_path, True


def _write_fp32_record(folder: Path, ref: ModelRef, report: Any) -> None:
    record = {"spec": ref.spec, "kind": ref.kind, "name": ref.name, "key": ref.content_key,
              "description": ref.description, "parity": report.to_dict()}
    atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2) + "\n")


def model_key(ref: ModelRef) -> str:
    """The key int8 exports of ``ref`` live under: its content key, or for an fp32 ``.onnx`` that
    this cache wrote (``models/<key>/encoder.onnx`` + ``model.json``), the key of its model."""
    path = ref.onnx_path
    if path is not None and path.name == ONNX_NAME:
        record = export_record(path)
        if record and record.get("key") == path.parent.name and "precision" not in record:
            return str(record["key"])
    return ref.content_key


def calibration_key(spec: str | Path, *, images: int = CALIBRATION_IMAGES, verify: int = VERIFICATION_IMAGES,
                    method: str = "minmax") -> str:
    """16 hex digits naming one calibration: the source's fingerprint, the sample sizes and the method."""
    from ascl.image_sources import source_fingerprint

    _, fingerprint = source_fingerprint(spec)
    return hashlib.sha256(f"{fingerprint}\0{images}\0{verify}\0{method}".encode()).hexdigest()[:16]


def int8_folder(ref: ModelRef, calibration: str | Path, cache: str | Path | None = None) -> Path:
    """Where the int8 export of ``ref`` calibrated on ``calibration`` lives (or will live)."""
    return cache_dir(cache) / "models" / model_key(ref) / f"int8-{calibration_key(calibration)}"


def _cached_int8(ref: ModelRef, fp32: Path, *, cache: str | Path | None, refresh: bool,
                 calibration: str | Path | None, min_recall: float | None) -> tuple[Path, bool]:
    from ascl.export.parity import MIN_RECALL_AT_10

    threshold = MIN_RECALL_AT_10["int8"] if min_recall is None else float(min_recall)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--min-recall must lie in [0, 1], got {threshold}")
    if ref.onnx_path is not None and onnx_facts(fp32).precision == "int8":
        return fp32, False  # an int8 graph already; it was verified when it was exported
    if calibration is None:
        raise CalibrationNeededError(
            "int8 needs calibration images: pass --calibration IMAGES (a sample like the gallery's: a folder, a "
            "list file, a .tar.gz or cifar10-offline)"
        )
    folder = int8_folder(ref, calibration, cache)
    onnx_path = folder / ONNX_NAME
    record = export_record(onnx_path) if onnx_path.is_file() else None
    if record is not None and not refresh:
        _check_recorded_recall(record, threshold)
        return onnx_path, False
    began = time.perf_counter()
    calibration_set, verification, overlaps = _samples(calibration, fp32)
    from ascl.export.int8 import int8_from_onnx

    with atomic_dir(folder) as tmp:
        report = int8_from_onnx(fp32, tmp / ONNX_NAME, calibration_set, verification, min_recall=threshold)
        record = {
            "precision": "int8", "key": model_key(ref), "spec": ref.spec, "name": ref.name,
            "description": ref.description,
            "from_fp32": {"path": str(fp32.resolve()), "sha256": file_digest(fp32)},
            "calibration": {"spec": str(calibration), "source": calibration_set.source,
                            "images": len(calibration_set), "method": "minmax",
                            "key": folder.name.removeprefix("int8-")},
            "verification": {"source": verification.source, "images": len(verification),
                             "overlaps_calibration": overlaps},
            "recall_at_10": report.recall_at_10, "min_recall_at_10": report.min_recall_at_10,
            "parity": report.to_dict(), "seconds": round(time.perf_counter() - began, 1),
        }
        atomic_write_text(tmp / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    return onnx_path, True


def _check_recorded_recall(record: dict[str, Any], threshold: float) -> None:
    """A cached int8 file measured below the threshold asked for now is refused like a fresh one."""
    from ascl.export.int8 import PrecisionRefusedError, refusal_message
    from ascl.export.parity import ParityReport

    recall = float(record.get("recall_at_10") or 0.0)
    if recall < threshold:
        report = ParityReport(**{**record["parity"], "min_recall_at_10": threshold, "passed": False})
        where = (f"(measured when it was cached, on {record['verification']['images']} verification images of "
                 f"{record['verification']['source']})")
        raise PrecisionRefusedError(refusal_message(recall, threshold, where), [report])


def describe_int8(path: str | Path, made_now: bool, threshold: float | None = None) -> str:
    """One line for the screen: int8, calibrated on what, its recall@10 vs fp32 against the
    threshold (default: the one it was checked against), quantized now or cached where."""
    record = export_record(path) or {}
    parts = ["int8"]
    if "calibration" in record:
        threshold = record["min_recall_at_10"] if threshold is None else threshold
        cal, ver = record["calibration"], record["verification"]
        parts.append(f"calibrated on {cal['images']} images of {cal['source']}")
        parts.append(f"recall@10 vs fp32 {record['recall_at_10']:.4f} on {ver['images']} verification images "
                     f"(threshold {threshold})")
    parts.append(f"{'quantized to' if made_now else 'cached at'} {path}")
    return ", ".join(parts)


def _samples(calibration: str | Path, fp32: Path) -> tuple[Any, Any, bool]:
    """(calibration ImageSet, verification ImageSet, whether they overlap) from one read of the source."""
    from ascl.export.image_sets import ImageSet, load_image_set

    size = onnx_facts(fp32).image_size
    try:
        sample = load_image_set(calibration, size, count=CALIBRATION_IMAGES + VERIFICATION_IMAGES)
    except ValueError as exc:  # ImageSourceNotFound (an AsclError) passes: it names the missing path
        if isinstance(exc, AsclError):
            raise
        raise CalibrationNeededError(f"--calibration {calibration}: {exc}") from exc

    def part(lo: int, hi: int) -> ImageSet:
        labels = None if sample.labels is None else sample.labels[lo:hi]
        return ImageSet(sample.images[lo:hi], labels, sample.classes, sample.source)

    n = len(sample)
    if n - CALIBRATION_IMAGES >= MIN_DISJOINT_VERIFICATION:
        return part(0, CALIBRATION_IMAGES), part(CALIBRATION_IMAGES, n), False
    if n < 11:
        raise CalibrationNeededError(f"--calibration {calibration}: {n} images; int8 needs at least 11 to calibrate "
                                     "and verify (a few hundred is better)")
    return part(0, min(n, CALIBRATION_IMAGES)), part(0, n), True
