"""``ascl push``, ``ascl pull`` and ``ascl models``: publish encoders to a Hugging Face Hub,
fetch them, and list the ones this machine has (``ascl.model_cards.publish``, ``.catalog``).

Only argparse at import time; torch and huggingface_hub load inside the commands. Errors are
``ascl.errors.AsclError`` subclasses, raised to ``ascl.cli.main``, which prints them and
returns their exit code (2: bad input such as a --repo-id that is not USER/NAME; 1: the hub
refused or could not provide a model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ascl.errors import FAILURE, AsclError

HELP_FMT = argparse.ArgumentDefaultsHelpFormatter


def register(sub: Any) -> None:
    """Add the ``push``, ``pull`` and ``models`` subcommands."""
    push = sub.add_parser(
        "push",
        help="export an encoder with its model card and upload it to the Hub",
        description=(
            "Export the encoder of a training run (no queue, momentum encoder or heads) as a hub folder "
            "(config.json, safetensors, README.md card with plots), evaluate it when labelled data is given, "
            "and upload it with huggingface_hub. The endpoint comes from HF_ENDPOINT, the token from "
            "HF_TOKEN or 'hf auth login'."
        ),
        formatter_class=HELP_FMT,
    )
    push.add_argument("source", metavar="RUN_OR_MODEL",
                      help="a run folder, a checkpoint .pt, a hub folder, a registered model name or a repo id")
    push.add_argument("--repo-id", required=True, help="target repo USER/NAME (also the model's name on its card)")
    push.add_argument("--private", action="store_true", help="create the repo private (only if it does not exist yet)")
    push.add_argument("--revision", default=None,
                      help="branch to upload to, created from main if missing (None: main)")
    push.add_argument("--dry-run", action="store_true", help="write the folder only; upload nothing")
    push.add_argument("--out", type=Path, default=None,
                      help="folder to write, replaced as a whole (None: hub/<NAME> with --dry-run, "
                      "a temporary folder otherwise)")
    push.add_argument("--data", default=None,
                      help="labelled dataset spec to measure kNN top-1 and linear-probe accuracy on and to plot "
                      "the validation embeddings: a folder root/<class>/<images>, digits, cifar10-offline[:TAR], "
                      "cifar10, ... as for 'ascl train --data' (None: the run's own data.spec)")
    push.add_argument("--val-fraction", type=float, default=None,
                      help="share of every class held out as the val split when the data has no test split "
                      "(None: the run's data.val_fraction, else 0.1); keep the run's value to report comparable numbers")
    push.add_argument("--eval-subset", type=int, default=0,
                      help="cap on train and val images for the evaluation (0 = all); a few thousand is enough "
                      "for a quick CPU check, use all for the published numbers")
    push.add_argument("--no-eval", action="store_true",
                      help="do not evaluate; the card then reports the kNN accuracy recorded by the run, if any")
    push.add_argument("--device", default="auto", help="device for the evaluation: auto, cpu, cuda, cuda:1, ...")
    push.add_argument("--hardware", default=None,
                      help="hardware the model was trained on, for the card (None: the run's run.json, if any)")
    push.add_argument("--wall-time-s", type=float, default=None,
                      help="training wall time in seconds, for the card (None: the run's run.json, if any)")
    push.add_argument("--run-info", type=Path, default=None,
                      help="JSON record of the training run (run.json, or the result JSON of "
                      "benchmarks/time_to_accuracy.py): hardware, wall time, recipe, curve PNG and recorded "
                      "accuracies for the card; numbers measured with --data replace recorded ones")
    push.add_argument("--card-command", action="append", default=[], metavar="COMMAND",
                      help="a command that made this model, shown on the card under 'How it was made' (repeat, in "
                      "order: e.g. the ascl train line, then this ascl push line)")
    push.add_argument("--max-shard-size", default="5GB",
                      help="largest safetensors file, e.g. 16MB; above it the hub's sharded format is written. "
                      "Shards of a few hundred MB download and resume better on slow links")
    push.set_defaults(func=cmd_push)

    pull = sub.add_parser(
        "pull",
        help="download a model repo to the local cache and print its path",
        description="Download a model from the Hub (HF_ENDPOINT) into the huggingface cache (HF_HOME) and print "
        "the local folder. With HF_HUB_OFFLINE=1 it prints the cached folder without network access.",
        formatter_class=HELP_FMT,
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="repo USER/NAME, or a registered model name")
    pull.add_argument("--revision", default=None, help="branch, tag or commit (None: main)")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser(
        "models",
        help="list the shipped and cached encoders (the default marked *), or print one model's folder",
        description="List every encoder this machine has: the ones shipped with ascl-hub and the ones in the "
        "Hugging Face cache (HF_HOME), with arch, base width, embedding dim, kNN top-1 from the model card, "
        "size on disk and folder; '*' marks the default, which 'ascl up', 'ascl serve', 'ascl index' and "
        "load_encoder() use when no model is given. Nothing is downloaded.",
        formatter_class=HELP_FMT,
    )
    models.add_argument("--path", metavar="NAME", default=None,
                        help="print only the local folder of NAME (a registered name, 'default', or a cached repo "
                        "id), e.g. cd \"$(ascl models --path default)\"")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.set_defaults(func=cmd_models)


class NotOnThisMachine(AsclError, LookupError):
    """A model name ``ascl models --path`` cannot find among the shipped and cached models (exit 1)."""

    exit_code = FAILURE


def cmd_push(args: argparse.Namespace) -> int:
    """Export (and unless --dry-run, upload) the encoder of ``args.source``."""
    from ascl.model_cards.publish import check_repo_id

    name = check_repo_id(args.repo_id)
    if args.out is None and not args.dry_run:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ascl-push-") as tmp:
            return _push(args, Path(tmp) / name, name)
    return _push(args, args.out or Path("hub") / name, name)


def _push(args: argparse.Namespace, out: Path, name: str) -> int:
    from ascl.model_cards.publish import EvalRequest, export_folder, upload

    evaluation = EvalRequest(data=args.data, val_fraction=args.val_fraction, subset=args.eval_subset,
                             device=args.device, enabled=not args.no_eval)
    folder, facts = export_folder(
        args.source, out, repo_id=args.repo_id, name=name, evaluation=evaluation, hardware=args.hardware,
        wall_time_s=args.wall_time_s, run_info=args.run_info, max_shard_size=args.max_shard_size,
        commands=args.card_command,
    )
    for m in facts.metrics:
        print(f"{m.name}: {m.value:.2f}% on {m.split} ({m.source})")
    if not facts.metrics:
        print("not evaluated: pass --data SPEC (labelled data) to measure accuracy")
    print(f"wrote {folder}")
    if args.dry_run:
        return 0
    url = upload(folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"uploaded {args.repo_id}: {url}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download ``args.repo_id`` (the whole repo: weights, card, plots) to the cache and print the folder.

    Resolution is the core's (``resolve_model(..., from_hub=True)``): a registered name asks the
    hub for its repo and, when the hub cannot provide it and no revision was asked for, falls
    back to the copy shipped with the package.
    """
    import sys

    from ascl.models import resolve_model

    ref = resolve_model(args.repo_id, revision=args.revision, from_hub=True)
    if ref.kind == "shipped":
        print(f"the hub could not provide {ref.repo_id}; using the copy shipped with ascl-hub", file=sys.stderr)
    print(ref.path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model catalogue, or one model's folder."""
    import json

    from ascl.model_cards import catalog

    if args.path is not None:
        try:
            print(catalog.model_path(args.path))
        except LookupError as e:
            if isinstance(e, AsclError):
                raise
            raise NotOnThisMachine(str(e)) from e
        return 0
    entries = catalog.all_models()
    if args.json:
        rows = [{**e.__dict__, "path": str(e.path)} for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print("no encoders here: none shipped, none in the Hugging Face cache. Train one with 'ascl train' "
              "or download one with 'ascl pull REPO_ID'.")
        return 0
    print(catalog.format_table(entries))
    return 0
