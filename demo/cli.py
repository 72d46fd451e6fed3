"""Subcommands ``demo`` (the Gradio page on a server or in-process) and ``up`` (everything at once)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ascl.demo.gallery_images import DEFAULT_SUBSET
from ascl.demo.page_limits import ADDS_PER_CLIENT, MAX_ADDS
from ascl.errors import InputError, user_errors
from ascl.image_sources import describe_specs

Formatter = argparse.ArgumentDefaultsHelpFormatter
MISSING_EXTRAS = "install the serving and demo extras (pip install 'ascl-hub[serve,demo]'): "


def register(sub: Any) -> None:
    """Add ``ascl demo`` and ``ascl up``."""
    from ascl.serving.online.precision import add_precision_options  # only argparse and help texts

    up = sub.add_parser(
        "up", formatter_class=Formatter,
        help="one command to a running image search: model, index, Triton and the demo page",
        description=("Make sure the model is here and exported, build the gallery index, start Triton and the "
                     "Gradio demo, print the URLs, and stop everything on Ctrl-C. Everything is cached under "
                     "--cache, keyed by model and gallery content, so the second start is fast."),
    )
    up.add_argument("--model", default=None,
                    help="model name, hub repo id, hub folder, training run or checkpoint; default: the shipped "
                         "default model ('ascl models' marks it), else your newest run in runs/, else a random "
                         "encoder (with a warning)")
    up.add_argument("--gallery", default=None,
                    help=f"the images to search: {describe_specs()}; default: --gallery-size images of the "
                         "offline CIFAR-10 copy when one is found, else torchvision CIFAR-10 (online), else "
                         "scikit-learn's digits")
    up.add_argument("--gallery-size", type=int, default=DEFAULT_SUBSET,
                    help="images taken from CIFAR-10 for the default gallery (balanced over classes); more images "
                         "take longer to embed on the first start (once: the index is cached)")
    _add_port_args(up)
    up.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    up.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port (health: /v2/health/ready)")
    up.add_argument("--metrics-port", type=int, default=8002, help="Triton Prometheus metrics port")
    up.add_argument("--index", default=None,
                    help="where the gallery index lives: a folder, or milvus://HOST:PORT/COLLECTION (a Milvus "
                         "server; several 'ascl up'/'ascl serve' replicas can share it) or "
                         "milvus+lite:///PATH.db#COLLECTION; built from --gallery when it does not exist yet; "
                         "default: a folder in --cache keyed by model and gallery")
    up.add_argument("--refresh", action="store_true", help="export the model again even when a cached export exists "
                                                           "(use after a hub model changed)")
    add_precision_options(up, "the gallery's own images (those of its index), else the CIFAR-10 copy "
                              "(cifar10-offline) when one is found")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser(
        "demo", formatter_class=Formatter,
        help="the Gradio image-search page, on a running Triton server or in-process",
        description=("Serve the search page. With --server it asks a running 'ascl serve'/'ascl up' over gRPC; "
                     "with --in-process it runs the ONNX model and FAISS index itself (no Triton needed)."),
    )
    demo.add_argument("--server", default="localhost:8001", help="Triton gRPC address (HOST:PORT)")
    demo.add_argument("--index", default=None,
                      help="index folder (from 'ascl index build') or milvus://HOST:PORT/COLLECTION; needed for --in-process, and with --server for "
                           "clickable examples and for adding images (it must be the folder the server reads)")
    demo.add_argument("--in-process", action="store_true", help="search in this process with ONNX Runtime + FAISS")
    demo.add_argument("--model", default=None,
                      help="with --in-process: an exported .onnx file, or any model 'ascl up --model' accepts "
                           "(exported into --cache on first use); default: the model the index was built with, "
                           "else as 'ascl up'")
    _add_port_args(demo)
    demo.set_defaults(func=cmd_demo)


def _add_port_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=7860, help="port of the demo page (bound to 127.0.0.1)")
    parser.add_argument("--max-adds", type=int, default=MAX_ADDS,
                        help="images the page's 'Add' may put into the index in one run, all visitors together (0: "
                             "none); each is a file of up to 20 MiB in the index folder")
    parser.add_argument("--max-adds-per-client", type=int, default=ADDS_PER_CLIENT,
                        help="images one visitor (client address) may add per hour")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder for exports, galleries and indexes; default $ASCL_CACHE, else "
                             "~/.cache/ascl")


def cmd_up(args: argparse.Namespace) -> int:
    from ascl.demo.up import Ports, UpOptions, default_cache, run_up

    if args.gallery_size < 10:
        raise InputError(f"--gallery-size must be at least 10, got {args.gallery_size}")
    opts = UpOptions(model=args.model, gallery=args.gallery, cache=(args.cache or default_cache()).expanduser(),
                     ports=Ports(args.port, args.grpc_port, args.http_port, args.metrics_port),
                     gallery_size=args.gallery_size, refresh=args.refresh, precision=args.precision,
                     calibration=args.calibration, min_recall=args.min_recall, index=args.index,
                     max_adds=args.max_adds, max_adds_per_client=args.max_adds_per_client)
    with user_errors(ImportError, prefix=MISSING_EXTRAS), user_errors(FileNotFoundError, LookupError, ValueError):
        return run_up(opts)


def cmd_demo(args: argparse.Namespace) -> int:
    from ascl.demo.app import build_app, close, launch, quiet_gradio
    from ascl.demo.page_limits import AddQuota
    from ascl.demo.up import default_cache, example_files, gallery_roots, terminate_on_sigterm
    from ascl.serving.online.gallery import as_spec, index_exists

    quiet_gradio()
    cache = (args.cache or default_cache()).expanduser()
    index = as_spec(args.index) if args.index else None
    with user_errors(ValueError):
        if index is not None and not index_exists(index):
            raise InputError(f"--index {index}: not an index folder or collection; build one with 'ascl index build'")
    with user_errors(FileNotFoundError, ValueError, RuntimeError):
        backend = _demo_backend(args, cache)
    examples = example_files(index) if index is not None else []
    allowed = gallery_roots(index) if index is not None else []
    app = build_app(backend, examples, subtitle=f"Searching with {backend.description}.",
                    quota=AddQuota(args.max_adds_per_client, args.max_adds))
    with terminate_on_sigterm():
        try:
            url = launch(app, args.port, allowed_paths=allowed)
            print(f"demo: {url}  (Ctrl-C to stop)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...", flush=True)
        finally:
            close(app)
    return 0


def _demo_backend(args: argparse.Namespace, cache: Path) -> Any:
    from ascl.serving.online.gallery import InProcessGallery, TritonGallery
    from ascl.serving.online.serve import choose_model, served_model

    if not args.in_process:
        return TritonGallery(args.server, args.index)
    if args.index is None:
        raise InputError("--in-process needs --index IDX (an index folder from 'ascl index build' or 'ascl up')")
    served = served_model(choose_model(args.model, index=args.index), index=args.index, cache=cache)
    return InProcessGallery(served.onnx, args.index)
