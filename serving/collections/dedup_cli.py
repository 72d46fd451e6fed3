"""Subcommand ``dedup``: groups of near-duplicate images in an image source or an index folder.

Only argparse at import time; FAISS, ONNX Runtime and pyarrow load inside the command. The
work is ``ascl.serving.collections.dedup``'s (grouping rule and range search per index type: its module doc).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ascl.errors import InputError, user_errors

FMT = argparse.ArgumentDefaultsHelpFormatter
DEFAULT_THRESHOLD = 0.94  # = ascl.serving.collections.dedup.DEFAULT_THRESHOLD (checked by the tests; not imported: numpy)
# Builtin errors of FAISS, ONNX Runtime, PIL and the file system that mean bad input here.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)


def cmd_dedup(args: argparse.Namespace) -> int:
    from ascl.serving.collections import dedup

    if (args.images is None) == (args.index is None):
        raise InputError("give either IMAGES (an image source to embed) or --index IDX (an index folder), not "
                         f"{'both' if args.images else 'neither'}")
    if args.drop and args.index is None:
        raise InputError("--drop removes duplicates from an index: it needs --index IDX (IMAGES are never deleted)")
    if args.limit is not None and args.index is not None:
        raise InputError("--limit applies to IMAGES only")
    threshold = dedup.check_threshold(args.threshold)
    out = dedup.check_output(args.out)
    with user_errors(*USER_ERRORS):
        if args.index is not None:
            from ascl.serving.collections.index import recorded_onnx

            recorded = recorded_onnx(args.index)
            model = args.model or (str(recorded) if recorded else None)  # needed only if the vectors cannot be read back
            result = dedup.dedup_index(args.index, threshold, onnx_path=(lambda: _onnx(model)) if model else None,
                                       batch_size=args.batch_size)
        else:
            onnx = _onnx(args.model or "default")
            result = dedup.dedup_images(onnx, args.images, threshold, batch_size=args.batch_size, limit=args.limit)
        dedup.write_groups(result, out)
    print(f"{result.summary()}; wrote {len(result.rows())} rows to {out}")
    if args.drop:
        with user_errors(*USER_ERRORS):
            dropped = dedup.drop_duplicates(args.index, result)
        print(f"{args.index}: removed {dropped.removed} duplicates, kept the first image of each group; "
              f"version {dropped.version}")
    return 0


def _onnx(spec: str) -> Path:
    from ascl.serving.collections.model_files import resolve_onnx

    return resolve_onnx(spec)


def register(sub: Any) -> None:
    """Add ``dedup`` to the ``ascl`` command."""
    from ascl.image_sources import describe_specs

    p = sub.add_parser(
        "dedup", formatter_class=FMT,
        help="find groups of near-duplicate images (re-encoded, resized, cropped copies) in images or an index",
        description="Groups images whose embeddings have cosine similarity >= --threshold with the group's first "
                    "image (images in source order; by id in an index), and writes one row per grouped image: "
                    "group, path, similarity (to the group's first image; 1.0 for it), id and label when known. "
                    "Images alone are not written. With --index and --drop, every group's other images are "
                    "removed from the index (one new version, under the index's writer lock).")
    p.add_argument("images", nargs="?", default=None, metavar="IMAGES", help=describe_specs())
    p.add_argument("--index", default=None, metavar="IDX",
                   help="an index ('ascl index build': a folder, or milvus://HOST:PORT/COLLECTION) instead of IMAGES: its "
                        "stored vectors are grouped")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, metavar="T",
                   help="cosine similarity in (0, 1] at or above which two images count as near-duplicates; the "
                        "default is the best precision/recall trade-off measured for the shipped default on "
                        "CIFAR-10 with planted copies (benchmarks/README.md); raise it for fewer false matches, "
                        "lower it to catch heavier edits")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="where to write the groups: FILE.csv or FILE.parquet (Parquet needs pyarrow)")
    p.add_argument("--model", default=None,
                   help="an exported .onnx file, a training run folder or checkpoint, a hub folder, a shipped model "
                        "name or a hub repo id (exported to ONNX once and cached); default: with --index the model "
                        "the index was built with (used only if its vectors cannot be read back), else 'default'")
    p.add_argument("--drop", action="store_true",
                   help="with --index: keep the first image of every group in the index and remove the others")
    p.add_argument("--batch-size", type=int, default=256, help="images embedded per ONNX Runtime call")
    p.add_argument("--limit", type=int, default=None, help="look at most at this many images of IMAGES")
    p.set_defaults(func=cmd_dedup)
