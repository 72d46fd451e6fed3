"""Subcommands ``serve`` and ``query``: the Triton search service and its command-line client.

Only argparse at import time; FAISS, ONNX Runtime and tritonclient load inside the commands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from ascl.errors import InputError, user_errors
from ascl.serving.collections.index_cli import INDEX_HELP, add_model_option

FMT = argparse.ArgumentDefaultsHelpFormatter
# Builtin errors of FAISS, ONNX Runtime, PIL and the file system that mean bad input here; the
# root CLI reports them (ascl.errors: exit 2), and our own AsclErrors pass through unchanged.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError, OSError)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve_repository_dir() -> Path:
    """A fresh folder for this process's model repository, under the cache; folders that a
    killed ``ascl serve`` left behind (their process is gone) are removed first."""
    from ascl.cache import cache_dir

    root = cache_dir() / "serve"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("repo-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"repo-{os.getpid()}-", dir=root))


def cmd_serve(args: argparse.Namespace) -> int:
    import sys

    from ascl.serving.collections.index import read_info
    from ascl.serving.online.limits import Limits
    from ascl.serving.online.repository import Batching, docker_command, write_repository
    from ascl.serving.online.serve import check_ports_free, choose_model, served_model, start_service
    from ascl.serving.online.server import ADMIN_KEY_HEADER, ServerError

    max_request = int(args.max_request_mb * 2**20)
    limits = Limits(max_request_bytes=max_request, max_in_flight=args.max_in_flight,
                    max_connections=args.max_connections, idle_timeout_s=args.idle_timeout,
                    header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)
    with user_errors(*USER_ERRORS):
        batching = Batching(queue_delay_us=args.queue_delay_us, instances=args.instances,
                            max_queue_size=args.max_queue)
        read_info(args.index)  # IndexFileError (what to do) when it is no index
        if not args.repository_only:
            check_ports_free({"--grpc-port": args.grpc_port, "--http-port": args.http_port,
                              "--metrics-port": args.metrics_port}, args.host)
        choice = choose_model(args.model, index=args.index)
        print(f"model: {choice.description}", flush=True)
        if choice.warning:
            print(f"WARNING: {choice.warning}", file=sys.stderr, flush=True)
        served = served_model(choice, args.precision, index=args.index, calibration=args.calibration,
                              min_recall=args.min_recall)  # exit 2, naming both, for another model's index
        print(f"encoder: {served.description}", flush=True)
        if args.repository_only:
            repo = write_repository(args.repository_only, served.onnx, args.index, platform=args.platform,
                                    copy_index=True, plan_path=args.plan, max_request_bytes=max_request,
                                    facts=served.facts, batching=batching)
            print(f"wrote the production model repository {repo}")
            if args.platform == "tensorrt" and not args.plan:
                print(f"build its engine on the serving GPU first: ascl export tensorrt {served.onnx} "
                      f"--out {repo}/encoder/1/model.plan --min 1 --opt 64 --max 256")
            print("serve it with NVIDIA's Triton container:\n  " + docker_command(repo))
            return 0
    keep = args.repository is not None
    repo_dir = Path(args.repository) if keep else serve_repository_dir() / "models"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    service = None
    try:
        print(f"starting tritonserver ({served.precision} encoder) on the model repository {repo_dir} ...", flush=True)
        with user_errors(*USER_ERRORS):
            service = start_service(served, args.index, repo_dir, grpc_port=args.grpc_port,
                                    http_port=args.http_port, metrics_port=args.metrics_port, host=args.host,
                                    limits=limits, verbose=args.verbose,
                                    start_timeout_s=args.start_timeout, batching=batching)
        print(f"ready: gRPC {service.grpc_url}  HTTP {service.http_url}  metrics {service.metrics_url}\n"
              f"  health: {service.http_url}/v2/health/ready   (inference, health and metadata only)\n"
              f"  try: ascl query IMAGE -k 10 --server {service.grpc_url}   (Ctrl-C stops)", flush=True)
        if args.print_admin_key:
            print(f"  admin key (header {ADMIN_KEY_HEADER!r} on Triton's private ports): {service.admin_key}",
                  flush=True)
        failure = service.wait()
        if failure:
            raise ServerError(failure)
        return 0
    except KeyboardInterrupt:
        print("stopping: in-flight requests finish first...", flush=True)
        return 0
    finally:
        if service is not None:
            service.stop()
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            shutil.rmtree(repo_dir.parent, ignore_errors=True)


def parse_where_args(items: list[str] | None) -> dict[str, str | list[str]]:
    """``--where FIELD=VALUE`` options as a filter: one field repeated is any of its values, fields AND."""
    where: dict[str, list[str]] = {}
    for item in items or []:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise InputError(f"--where {item!r}: expected FIELD=VALUE, e.g. --where label=cat")
        where.setdefault(field.strip(), []).append(value)
    return {f: v[0] if len(v) == 1 else v for f, v in where.items()}


def cmd_query(args: argparse.Namespace) -> int:
    from ascl.serving.collections.filters import where_json
    from ascl.serving.online.client import Client

    where = parse_where_args(args.where)
    where_json(where)  # a filter over the size limit fails here, before any connection
    # tritonclient raises its own exception type for server-side and connection errors
    with user_errors(Exception, prefix=f"{args.server}: "), Client(args.server, protocol=args.protocol) as client:
        results = client.search(args.images, k=args.k, where=where or None)
    for image, hits in zip(args.images, results, strict=True):
        print(image)
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:3d}. id {hit.id:<8d} score {hit.score:.4f}  label {hit.metadata.get('label')!s:<12} "
                  f"{hit.metadata.get('path', '')}")
    return 0


def _add_limits(p: argparse.ArgumentParser) -> None:
    """What clients may claim of the service, all together; the defaults leave ordinary load
    (tens of concurrent requests) untouched."""
    from ascl.serving.online.limits import MAX_QUEUE_SIZE, Limits

    d = Limits()
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                   help="inference requests inside the service at once; more are refused at once with UNAVAILABLE "
                        "(HTTP 503, retry shortly) instead of waiting without bound")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE_SIZE,
                   help="requests each Triton model's queue holds; more are refused with UNAVAILABLE / 503 (the "
                        "backpressure of a --repository-only production repository, which has no front door)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open client connections per port (gRPC, HTTP); more are closed at once. Lowered "
                        "automatically to what the process's open-file limit (ulimit -n) holds")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help="seconds an open connection with no request in flight is kept")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a new connection has to send its first request's headers (gRPC: its handshake)")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds an HTTP request's body has to arrive (64 MiB in 60 s is about 9 Mbit/s)")


def register(sub: Any) -> None:
    """Add ``serve`` and ``query`` to the ``ascl`` command."""
    from ascl.serving.online.precision import add_precision_options  # only argparse and help texts

    serve = sub.add_parser("serve", help="serve embedding and image search with Triton (gRPC + HTTP)",
                           formatter_class=FMT)
    add_model_option(serve, None, "default: the model the index was built with (when its ONNX file is here), else "
                                  "the shipped default, else your newest run in runs/, else a random encoder "
                                  "(with a warning)")
    serve.add_argument("--index", required=True,
                       help="the gallery index from 'ascl index build': " + INDEX_HELP + "; several 'ascl serve' "
                            "replicas can share one Milvus collection, and all see what a writer adds")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (clients, ascl query)")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (also /v2/health/ready)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (/metrics)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server on the network")
    serve.add_argument("--repository", default=None,
                       help="write the model repository here and keep it (default: a temporary folder)")
    serve.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the server to be ready")
    serve.add_argument("--max-request-mb", type=float, default=64.0,
                       help="largest request (all its images, encoded) the ports accept, as sent and once inflated "
                            "(HTTP gzip/deflate bodies); larger ones are refused before they are read or while they "
                            "inflate (gRPC RESOURCE_EXHAUSTED, HTTP 413)")
    serve.add_argument("--queue-delay-us", type=int, default=0,
                       help="microseconds each model's dynamic batcher may hold a request to fill a bigger batch; "
                            "a lone request waits all of it. 0 still batches the requests that queue while every "
                            "instance is busy; raise it for a GPU encoder, and measure (benchmarks/serve_load.py)")
    serve.add_argument("--instances", type=int, default=0,
                       help="instances of the image_search, embed and encoder models (one ONNX Runtime thread "
                            "each; each image_search instance holds the index in memory); 0: one per core, at most 4")
    _add_limits(serve)
    serve.add_argument("--print-admin-key", action="store_true",
                       help="print the key of Triton's restricted APIs (model repository, config, statistics, trace, "
                            "logging, shared memory) on its private ports; the public ports never serve them")
    serve.add_argument("--verbose", action="store_true", help="verbose Triton log")
    serve.add_argument("--repository-only", default=None, metavar="DIR",
                       help="only write a production repository for NVIDIA's Triton container to DIR and print the "
                            "docker command")
    serve.add_argument("--platform", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                       help="encoder backend of --repository-only: native onnxruntime_onnx or tensorrt_plan")
    serve.add_argument("--plan", default=None, help="TensorRT plan to put in the repository (--platform tensorrt)")
    add_precision_options(serve, "the index's own source images when they are on this machine, else the CIFAR-10 copy "
                          "(cifar10-offline) when one is found")
    serve.set_defaults(func=cmd_serve)

    query = sub.add_parser("query", help="search the served gallery with images and print ranked hits",
                           formatter_class=FMT)
    query.add_argument("images", nargs="+", help="image files to search with")
    query.add_argument("-k", type=int, default=10, help="hits per image")
    query.add_argument("--server", default="localhost:8001", help="gRPC host:port of 'ascl serve'")
    query.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="grpc (default port 8001) or http")
    query.add_argument("--where", action="append", default=None, metavar="FIELD=VALUE",
                       help="only hits whose metadata FIELD equals VALUE (compared as text), e.g. --where label=cat; "
                            "repeat it: the same field again adds a value (any of them), another field must match "
                            "too (AND); the server names the known fields when one is unknown")
    query.set_defaults(func=cmd_query)
