"""Subcommand ``embed``: any image source -> a Parquet embedding set (``ascl.serving.collections.embed``).

Only argparse at import time; ONNX Runtime, pyarrow and Ray load inside the command.
"""

from __future__ import annotations

import argparse
from typing import Any

from ascl.errors import user_errors


class FMT(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, the epilog's lines kept."""


# Builtin errors of ONNX Runtime, pyarrow and the file system that mean bad input here.
USER_ERRORS = (FileNotFoundError, ValueError, OSError)

EPILOG = """\
The output folder holds part-NNNNNN.parquet files (one row per image: id, path, label, sha1,
size, width, height, embedding), errors.parquet (id, path, error) for images that could not be
read, and _manifest.json (model, source, schema, finished parts). Run the same command again to
resume after an interruption: finished parts are kept, the part in progress is redone.
Build a search index from it with: ascl index build --from-parquet DIR --out IDX

Ray (pip install 'ascl-hub[scale]'): --engine ray runs the same pipeline on Ray Data; --address
auto joins the cluster this machine is part of, ray://HOST:10001 a remote one (Ray Client),
local a new local instance; without it, $RAY_ADDRESS or a new local instance.
"""


def cmd_embed(args: argparse.Namespace) -> int:
    from ascl.serving.collections.embed import RayOptions, embed_collection

    options = RayOptions(address=args.address, actors=args.actors, num_cpus_per_actor=args.num_cpus_per_actor,
                         num_gpus_per_actor=args.num_gpus_per_actor, decode_cpus=args.decode_cpus,
                         threads=args.threads)
    with user_errors(*USER_ERRORS):
        report = embed_collection(args.images, args.out, model=args.model, batch_size=args.batch_size,
                                  rows_per_file=args.max_rows_per_file, limit=args.limit, engine=args.engine,
                                  threads=args.threads, decode_workers=args.decode_workers,
                                  parallel_batches=args.parallel_batches, ray=options,
                                  progress=not args.no_progress)
    state = "complete" if report.complete else "not complete (run it again to go on)"
    resumed = f", {report.skipped} positions kept from before" if report.skipped else ""
    print(f"{report.out}: {report.total} embeddings in {report.parts} part files, {report.errors} unreadable images "
          f"(errors.parquet); this run added {report.added} ({report.errors_added} unreadable) in "
          f"{report.seconds:.1f} s, {report.images_per_s:.0f} images/s with the {report.engine} engine{resumed}; "
          f"{state}")
    return 0


def register(sub: Any) -> None:
    """Add ``embed`` to the ``ascl`` command."""
    from ascl.image_sources import describe_specs

    p = sub.add_parser("embed", help="embed an image collection into Parquet files (resumable; local or Ray)",
                       formatter_class=FMT, epilog=EPILOG,
                       description="Embed every image of a source into a folder of Parquet files.")
    p.add_argument("images", help=describe_specs())
    p.add_argument("--model", default=None,
                   help="an exported .onnx file (used as it is), a training run folder or checkpoint, a hub folder, "
                        "a shipped model name or a hub repo id (exported to ONNX once and cached); None: the "
                        "shipped default")
    p.add_argument("--out", required=True, help="the set folder to create, or to resume / extend with the same model")
    p.add_argument("--batch-size", type=int, default=256, help="images per ONNX Runtime call")
    p.add_argument("--max-rows-per-file", type=int, default=100_000,
                   help="source positions per part file; a killed run redoes at most one part")
    p.add_argument("--limit", type=int, default=None, help="embed at most the first N images of the source")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime threads (0: one per core), shared by --parallel-batches; with Ray: intra-op "
                        "threads per actor (0: ONNX Runtime's default, one per core of the node)")
    p.add_argument("--parallel-batches", type=int, default=0,
                   help="local engine: batches embedded at once, each with threads / parallel-batches intra-op "
                        "threads (0: as many as --threads, one thread each: no waiting at operator barriers)")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="local engine: decode threads feeding ONNX Runtime (0: one per core, at most 4)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data on an existing engine")
    p.add_argument("--address", default=None,
                   help="ray: the cluster (auto, ray://HOST:10001, local); default: $RAY_ADDRESS or a new local "
                        "instance")
    p.add_argument("--actors", type=int, default=0,
                   help="ray: ONNX Runtime actors (0: one per --num-gpus-per-actor GPUs, else the cluster's CPUs "
                        "beside one decode task)")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0, help="ray: CPUs each actor reserves")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0,
                   help="ray: GPUs each actor reserves (> 0: ONNX Runtime's CUDA provider)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="ray: CPUs each decode task reserves")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)
