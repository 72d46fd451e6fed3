"""``ascl export``: onnx, verify, tensorrt, golden.

Only argparse at import time; torch / onnxruntime / tensorrt are imported by the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ascl.errors import user_errors

if TYPE_CHECKING:
    from ascl.export.image_sets import ImageSet

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter
SIZE_RULE = (
    "The graph takes uint8 NHWC images at the model's own image size (any batch) and returns "
    "float32 unit-norm embeddings; resize other sizes first with ascl.images.decode_image "
    "(RGB, shorter side to the model size, centre crop), the rule serving and the demo use."
)
MODEL_HELP = (
    "the encoder: a training checkpoint (.pt) or run folder, a hub folder (config.json + safetensors), "
    "a registered model name or a hub repo id"
)


def _images_help(default: str) -> str:
    from ascl.image_sources import describe_specs

    return (f"real images to verify on (labels give kNN top-1): {describe_specs()}; default: {default}the "
            "CIFAR-10 JPEG tar when one is found (see cifar10-offline), else synthetic images (fp32 parity only "
            "means much then)")


# Builtin errors of ONNX, ONNX Runtime and the file system that mean bad input here; our own
# errors (ascl.errors.AsclError: model, calibration, output, parity) reach the root CLI as they are.
USER_ERRORS = (FileNotFoundError, PermissionError, ValueError)


def _calibration(args: argparse.Namespace, size: int) -> ImageSet | None:
    from ascl.export.image_sets import load_image_set
    from ascl.export.quantize import CalibrationError

    if not args.int8:
        return None
    if not args.calibration:
        raise CalibrationError("--int8 needs --calibration IMAGES (a sample of training images: a folder, a list "
                               "file, a .tar.gz or cifar10-offline; see --help)")
    # Same source as the verification gallery: take the images after the gallery's.
    offset = args.verify_size if args.images in (None, args.calibration) else 0
    try:
        return load_image_set(args.calibration, size, count=args.calibration_size, offset=offset)
    except ValueError as exc:
        raise CalibrationError(f"--calibration: {exc}; int8 calibration needs a sample of training images") from exc


def cmd_onnx(args: argparse.Namespace) -> int:
    from ascl.export.image_sets import verification_set
    from ascl.export.model_source import load_model
    from ascl.export.pipeline import ParityError, export_model

    try:
        with user_errors(*USER_ERRORS):
            loaded = load_model(args.model, revision=args.revision)
            size = loaded.encoder.image_size
            calibration = _calibration(args, size)
            gallery = verification_set(size, args.verify_size, args.images, args.calibration)
            result = export_model(
                loaded, args.out, gallery, opset=args.opset, fp16=args.fp16, calibration=calibration,
                calibration_method=args.calibration_method, force=args.force, batch_sizes=args.batch_sizes,
                min_recall=args.min_recall,
            )
    except ParityError as exc:
        for report in exc.reports:
            print(report.summary(), file=sys.stderr)
        raise ParityError(f"export refused, nothing written to {args.out}: a model missed its tolerance "
                          "(see above); use --force to write it anyway", exc.reports) from exc
    for report in result.reports:
        print(report.summary())
    for precision, path in result.files.items():
        print(f"wrote {path} ({precision})")
    print(f"wrote {result.report_path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ascl.atomic import atomic_write_text
    from ascl.export.image_sets import verification_set
    from ascl.export.model_source import load_model
    from ascl.export.pipeline import verify_file
    from ascl.export.runtime import resolve_providers

    with user_errors(*USER_ERRORS):
        loaded = load_model(args.model, revision=args.revision)
        size = loaded.encoder.image_size
        providers = resolve_providers(args.providers, image_size=size)
        gallery = verification_set(size, args.verify_size, args.images)
        report = verify_file(args.onnx, loaded.encoder, gallery, providers=providers, batch_sizes=args.batch_sizes,
                             min_recall=args.min_recall)
    print(report.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
    return 0 if report.passed else 1


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from ascl.export.tensorrt_build import build_engine

    with user_errors(*USER_ERRORS):
        plan = build_engine(args.onnx, args.out, min_batch=args.min, opt_batch=args.opt, max_batch=args.max,
                            fp16=args.fp16, workspace_gib=args.workspace_gib)
    print(f"wrote {plan} (batch {args.min}..{args.max}, tuned for {args.opt}{', fp16' if args.fp16 else ''})")
    return 0


def cmd_golden(args: argparse.Namespace) -> int:
    from ascl.export.golden import GOLDEN_IMAGES, INIT_KEY, INIT_SEED, init_encoder, model_key, write_golden
    from ascl.export.image_sets import verification_set

    with user_errors(*USER_ERRORS):
        if args.model:
            from ascl.export.model_source import load_model

            encoder = load_model(args.model, revision=args.revision).encoder
            key, source = model_key(args.model), {"kind": "spec", "spec": args.model, "revision": args.revision}
        else:
            encoder, key = init_encoder(INIT_SEED), INIT_KEY
            source = {"kind": "init", "seed": INIT_SEED}
        gallery = verification_set(encoder.image_size, GOLDEN_IMAGES, args.images)
        folder = write_golden(encoder, gallery.images, args.out, key=key, source={**source, "images": Path(gallery.source).name})
    print(f"wrote {folder}")
    return 0


def _common(p: argparse.ArgumentParser, *, verify_size: int, images_default: str = "") -> None:
    p.add_argument("--images", default=None, help=_images_help(images_default))
    p.add_argument("--verify-size", type=int, default=verify_size,
                   help="images in the verification gallery; more gives steadier recall@10, costs eager PyTorch time")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="batch sizes ONNX Runtime is checked at (batch 1 runs over the first 16 images)")
    p.add_argument("--min-recall", type=float, default=None,
                   help="recall@10 vs fp32 that fp16/int8 must reach; default 0.98 for fp16, 0.95 for int8")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when MODEL is a repo id")


def _add_onnx(sub: Any) -> None:
    from ascl.image_sources import describe_specs

    p = sub.add_parser("onnx", formatter_class=HELP_FORMAT, help="export MODEL to verified ONNX files",
                       description="Export MODEL to DIR/encoder.onnx (+ encoder_fp16.onnx, encoder_int8.onnx) and "
                       "DIR/export.json, each verified against eager PyTorch before it is written. " + SIZE_RULE)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (created if needed; files are replaced atomically)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset; 17 runs on ONNX Runtime >= 1.14 and TensorRT >= 8.6")
    p.add_argument("--fp16", action="store_true", help="also write encoder_fp16.onnx (for GPUs; slow on CPU)")
    p.add_argument("--int8", action="store_true", help="also write encoder_int8.onnx (static QDQ, per-channel; "
                   "fastest on CPU); needs --calibration")
    p.add_argument("--calibration", default=None,
                   help=f"training images for int8 calibration: {describe_specs()}")
    p.add_argument("--calibration-size", type=int, default=256,
                   help="calibration images; a few hundred is enough, more only costs time")
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation range estimate; try percentile if int8 recall@10 is too low")
    p.add_argument("--force", action="store_true", help="write files even when they miss the parity tolerance")
    _common(p, verify_size=256, images_default="the --calibration source (images disjoint from the calibration sample), else ")
    p.set_defaults(func=cmd_onnx)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser("verify", formatter_class=HELP_FORMAT, help="check an ONNX file against its PyTorch model",
                       description="Run ONNX against eager PyTorch on real images: fp32 needs cosine >= 0.9999 for "
                       "every embedding; fp16/int8 need recall@10 vs fp32 >= --min-recall. Exit 1 on a miss.")
    p.add_argument("onnx", metavar="ONNX", help="an exported .onnx file")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--providers", nargs="+", default=["cpu"],
                   help="ONNX Runtime execution providers in order: tensorrt, cuda, cpu (GPU ones need a driver)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    _common(p, verify_size=256)
    p.set_defaults(func=cmd_verify)


def _add_tensorrt(sub: Any) -> None:
    from ascl.export.profiles import TRT_MAX_BATCH, TRT_MIN_BATCH, TRT_OPT_BATCH

    p = sub.add_parser("tensorrt", formatter_class=HELP_FORMAT, help="build a TensorRT engine from an ONNX file",
                       description="Build a TensorRT .plan from the fp32 ONNX export with one batch profile "
                       "(the Triton tensorrt_plan config uses the same numbers). Needs "
                       "pip install 'ascl-hub[tensorrt]' and an NVIDIA GPU; the plan only runs on that GPU model "
                       "and TensorRT version.")
    p.add_argument("onnx", metavar="ONNX", help="the fp32 export (encoder.onnx); add --fp16 for half precision")
    p.add_argument("--out", required=True, help="the .plan file to write")
    p.add_argument("--min", type=int, default=TRT_MIN_BATCH, help="smallest batch the engine accepts")
    p.add_argument("--opt", type=int, default=TRT_OPT_BATCH, help="batch the kernels are tuned for: the usual one")
    p.add_argument("--max", type=int, default=TRT_MAX_BATCH, help="largest batch; keep it >= Triton's max_batch_size")
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels (faster; check with golden embeddings)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder scratch memory; more lets it try more tactics")
    p.set_defaults(func=cmd_tensorrt)


def _add_golden(sub: Any) -> None:
    from ascl.image_sources import describe_specs

    p = sub.add_parser("golden", formatter_class=HELP_FORMAT, help="(re)write a golden embedding set",
                       description="Store a few images and the embeddings MODEL gives them (eager PyTorch fp32) "
                       "under OUT/<model key>/, for the PyTorch / ONNX Runtime / TensorRT golden tests. Without "
                       "--model: the deterministically initialised resnet18 (seed 0).")
    p.add_argument("--model", default=None, help=MODEL_HELP + "; default: the seed-0 initialised resnet18")
    p.add_argument("--out", default=str(Path("tests") / "golden"), help="golden root folder")
    p.add_argument("--images", default=None,
                   help=f"where the 8 images come from: {describe_specs()}; default: the CIFAR-10 JPEG tar when "
                        "one is found, else synthetic images")
    p.add_argument("--revision", default=None, help="hub revision when MODEL is a repo id")
    p.set_defaults(func=cmd_golden)


def register(sub: Any) -> None:
    """Add ``ascl export {onnx,verify,tensorrt,golden}``."""
    parser = sub.add_parser("export", formatter_class=HELP_FORMAT, help="export encoders to ONNX / TensorRT",
                            description="Export, verify and compile encoders. " + SIZE_RULE)
    inner = parser.add_subparsers(dest="export_command", metavar="<export command>")
    inner.required = True
    _add_onnx(inner)
    _add_verify(inner)
    _add_tensorrt(inner)
    _add_golden(inner)
