"""The ``ascl`` command: one entry point, one subcommand module per concern.

Each module named in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on their parsers. Registration only builds argparse parsers;
heavy imports (torch, onnxruntime, gradio) happen inside the command functions, so
``ascl --help`` stays fast.

Errors are handled here, once: a command raises an ``ascl.errors.AsclError`` (or a subclass)
with a message that says what to do, and ``main`` prints ``error: <message>`` and returns its
``exit_code`` (2: bad input, 1: the operation failed; ``ascl.errors``). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ascl import __version__
from ascl.errors import AsclError

COMMAND_MODULES = (
    "ascl.training.cli",  # train, eval
    "ascl.export.cli",  # export
    "ascl.serving.collections.index_cli",  # index
    "ascl.serving.online.serve_cli",  # serve, query
    "ascl.serving.collections.embed_cli",  # embed
    "ascl.serving.collections.dedup_cli",  # dedup
    "ascl.model_cards.cli",  # push, pull, models
    "ascl.demo.cli",  # demo, up
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ascl",
        description=(
            "Train self-supervised image encoders with ASCL, export them to ONNX/TensorRT, "
            "and serve image search with Triton and FAISS. Run 'ascl <command> --help' for details."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ascl-hub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except AsclError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
