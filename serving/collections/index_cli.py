"""Subcommand ``index`` (build, add, remove, info): gallery indexes (FAISS folders, Milvus collections).

Only argparse at import time; FAISS and ONNX Runtime load inside the commands.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ascl.errors import InputError, user_errors

FMT = argparse.ArgumentDefaultsHelpFormatter
# Builtin errors of FAISS, ONNX Runtime, PIL and the file system that mean bad input here; the
# root CLI reports them (ascl.errors: exit 2), and our own AsclErrors pass through unchanged.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)


def add_model_option(p: argparse.ArgumentParser, default: str | None, when_absent: str) -> None:
    p.add_argument("--model", default=default,
                   help="an exported .onnx file, a training run folder or checkpoint, a hub folder, a shipped "
                        "model name ('default' = the shipped default, see 'ascl models') or a hub repo id "
                        f"(exported to ONNX once and cached under ~/.cache/ascl); {when_absent}")


def _add_images(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    from ascl.image_sources import describe_specs

    p.add_argument("--images", required=required, help=describe_specs())
    p.add_argument("--batch-size", type=int, default=256, help="images embedded per ONNX Runtime call")
    p.add_argument("--limit", type=int, default=None, help="index at most this many images of the source")


def cmd_build(args: argparse.Namespace) -> int:
    from ascl.serving.collections.build import build_index, build_index_from_parquet
    from ascl.serving.collections.model_files import resolve_onnx

    from_parquet = getattr(args, "from_parquet", None)
    if (args.images is None) == (from_parquet is None):
        raise InputError("pass exactly one of --images IMAGES (embed them now) and --from-parquet DIR "
                         "(embeddings written by 'ascl embed')")
    with user_errors(*USER_ERRORS):
        if from_parquet is not None:
            from ascl.export.identity import model_identity

            model = model_identity(resolve_onnx(args.model)) if args.model else None
            report = build_index_from_parquet(from_parquet, args.out, factory=args.factory, model=model)
        else:
            onnx = resolve_onnx(args.model)
            report = build_index(onnx, args.images, args.out, factory=args.factory, batch_size=args.batch_size,
                                 limit=args.limit)
    print(f"{args.out}: version {report.version}, {report.total} vectors ({report.factory}); added {report.added}, "
          f"skipped {report.skipped_known} already indexed and {report.skipped_bad} unreadable")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from ascl.serving.collections.index import read_info

    with user_errors(*USER_ERRORS):
        model = args.model or read_info(args.index).get("model", {}).get("onnx")
    if not model:
        raise InputError(f"{args.index}: the manifest names no model; pass --model")
    args.model, args.out, args.factory = model, args.index, "auto"
    return cmd_build(args)


def cmd_remove(args: argparse.Namespace) -> int:
    from ascl.serving.collections.build import remove_from_index

    with user_errors(*USER_ERRORS):
        removed, version = remove_from_index(args.index, args.ids or [], args.paths or [])
    print(f"{args.index}: removed {removed}; version {version}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ascl.serving.collections.build import index_info

    with user_errors(*USER_ERRORS):
        info = index_info(args.index)
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0




INDEX_HELP = ("an index folder (FAISS), or milvus://HOST:PORT/COLLECTION (a collection of a Milvus server; token "
              "from $ASCL_MILVUS_TOKEN) or milvus+lite:///PATH.db#COLLECTION (a local Milvus Lite file); Milvus "
              "needs pip install 'ascl-hub[milvus]'")


def register(sub: Any) -> None:
    """Add ``index`` to the ``ascl`` command."""
    index = sub.add_parser("index", help="build and maintain gallery indexes (FAISS folders, Milvus collections)", formatter_class=FMT)
    isub = index.add_subparsers(dest="index_command", metavar="<index command>")
    isub.required = True
    build = isub.add_parser("build", help="embed a gallery and write an index (re-runs skip known images)",
                            formatter_class=FMT)
    add_model_option(build, None, "default: the shipped default; with --from-parquet the set's own model (a --model "
                            "given must be the same)")
    _add_images(build, required=False)
    build.add_argument("--from-parquet", default=None, metavar="DIR",
                       help="index the embeddings of a Parquet set written by 'ascl embed' instead of embedding "
                            "--images (nothing is embedded again)")
    build.add_argument("--out", required=True, help="the index to create (or extend, with the same model): " + INDEX_HELP)
    build.add_argument("--factory", default="auto",
                       help="index type: auto (Flat below 50k vectors, HNSW32 below 300k, above: FAISS IVF+fast-scan "
                            "PQ with SQ8 re-ranking, Milvus IVF_SQ8), or a FAISS factory such as Flat, HNSW32, "
                            "IVF1024,PQ64, or a Milvus index type: FLAT, HNSW32, IVF_FLAT, IVF_SQ8")
    build.set_defaults(func=cmd_build)
    add = isub.add_parser("add", help="embed new images into an existing index (a server picks them up live)",
                          formatter_class=FMT)
    add.add_argument("--index", required=True, help=INDEX_HELP)
    add_model_option(add, None, "default: the model the index was built with")
    _add_images(add)
    add.set_defaults(func=cmd_add)
    remove = isub.add_parser("remove", help="remove entries by id or stored path", formatter_class=FMT)
    remove.add_argument("--index", required=True, help=INDEX_HELP)
    remove.add_argument("--ids", type=int, nargs="*", default=None, help="ids to remove")
    remove.add_argument("--paths", nargs="*", default=None, help="stored relative paths to remove")
    remove.set_defaults(func=cmd_remove)
    info = isub.add_parser("info", help="print what an index records about itself (version, model, ...) and counts per label", formatter_class=FMT)
    info.add_argument("--index", required=True, help=INDEX_HELP)
    info.set_defaults(func=cmd_info)
