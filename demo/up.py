"""``ascl up``: from nothing to a running image search in one command, and back to nothing.

Steps, each cached under ``--cache`` by the content it depends on, so a second start only
starts processes: choose the model and export it (the one serve path of
``ascl.serving.online.serve``, which ``ascl serve`` takes too), pick the gallery
(``ascl.demo.gallery_images``), build its index, get the encoder at ``--precision``, start
Triton with the model repository, start the Gradio page on top of it. Everything from serving
comes through its gallery seam, ``ascl.serving.online.gallery``. Ctrl-C or SIGTERM stops the
page, then Triton (which stops its Python-backend stubs), and the command exits with no process
left.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ascl.cache import cache_dir
from ascl.demo.gallery_images import Gallery, resolve_gallery
from ascl.demo.page_limits import ADDS_PER_CLIENT, MAX_ADDS, AddQuota
from ascl.serving.online.serve import ServedModel, choose_model, served_model

if TYPE_CHECKING:
    from ascl.serving.online.gallery import IndexSpec

T = TypeVar("T")
EXAMPLES = 12


@dataclass(frozen=True)
class Ports:
    """Where everything listens (all on 127.0.0.1)."""

    demo: int = 7860
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002

    def by_flag(self) -> dict[str, int]:
        """Each port under the command-line flag that sets it."""
        return {"--port": self.demo, "--grpc-port": self.grpc, "--http-port": self.http, "--metrics-port": self.metrics}


@dataclass
class Timings:
    """Seconds per start-up step, printed at the end and measured for the README."""

    steps: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def run(self, name: str, fn: Callable[[], T]) -> T:
        began = time.perf_counter()
        result = fn()
        self.steps[name] = time.perf_counter() - began
        return result

    def total(self) -> float:
        return time.perf_counter() - self.start


def default_cache() -> Path:
    """``$ASCL_CACHE``, else ``~/.cache/ascl``: the same cache ``ascl.serving`` uses."""
    return cache_dir()


def say(text: str) -> None:
    print(text, flush=True)


def shout(text: str) -> None:
    """A warning nobody can miss: boxed, on stderr."""
    bar = "!" * 78
    block = f"\n{bar}\n! WARNING: {text}\n{bar}\n"
    print(block, file=sys.stderr, flush=True)


def index_name(index: IndexSpec) -> str:
    """A file name for the index ``index``: a folder's name, a URI's last part (its collection)."""
    if isinstance(index, Path):
        return index.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(index).rsplit("/", 1)[-1].split("#")[-1])


def example_files(index_dir: IndexSpec, count: int = EXAMPLES) -> list[Path]:
    """Gallery images to click: one per label first, from the index's metadata."""
    from ascl.serving.online.gallery import index_records

    by_label: dict[str | None, list[Path]] = {}
    for result in index_records(index_dir):
        if result.file is not None:
            by_label.setdefault(result.label, []).append(result.file)
    picked: list[Path] = []
    while len(picked) < count and any(by_label.values()):
        for files in by_label.values():
            if files and len(picked) < count:
                picked.append(files.pop(0))
    return picked


def gallery_roots(index_dir: IndexSpec) -> list[Path]:
    """The folders the index's images live in (the page may show files from these only)."""
    from ascl.serving.online.gallery import files_folder, source_folders

    return sorted(set(source_folders(index_dir)) | {files_folder(index_dir).parent})


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt in the main thread, so one path stops everything.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class UpOptions:
    """Everything ``ascl up`` needs, from the command line."""

    model: str | None
    gallery: str | None
    ports: Ports
    cache: Path
    gallery_size: int
    refresh: bool = False
    precision: str = "fp32"  # or int8: the calibrated int8 copy of the model is served
    calibration: str | None = None  # int8 calibration images; default: the gallery's own
    min_recall: float = 0.95  # int8 is refused below this recall@10 vs fp32
    max_adds: int = MAX_ADDS  # images the page may add in one run, all visitors together
    max_adds_per_client: int = ADDS_PER_CLIENT  # per visitor (client address) and hour
    index: str | None = None  # where the gallery index lives (a folder or milvus://...); default: in the cache


class Prepared(NamedTuple):
    """What ``prepare`` made ready: the encoder to serve (and its file), the gallery and its index."""

    served: ServedModel
    onnx: Path  # served.onnx: the fp32 export, or its int8 copy
    gallery: Gallery
    index_dir: IndexSpec


def prepare(opts: UpOptions, timings: Timings) -> Prepared:
    """Model, ONNX export, gallery, index and the encoder to serve: cached steps, each announced on
    screen. The index is always built with the fp32 export; the encoder served is the fp32 file or,
    with ``--precision int8``, its calibrated int8 copy (calibrated on the index's own images
    unless ``--calibration`` says otherwise: the one default rule)."""
    choice = choose_model(opts.model)
    say(f"model:   {choice.description}")
    if choice.warning:
        shout(choice.warning)
    fp32 = timings.run("model", lambda: served_model(choice, cache=opts.cache, refresh=opts.refresh))
    say(f"         ONNX {'exported to' if fp32.made_now else 'cached at'} {fp32.onnx}")
    gallery = timings.run("gallery", lambda: resolve_gallery(opts.gallery, opts.cache, subset=opts.gallery_size))
    say(f"gallery: {gallery.description}")
    if gallery.note:
        shout(gallery.note)
    from ascl.serving.online.gallery import as_spec

    index_dir = as_spec(opts.index) if opts.index else opts.cache / "indexes" / f"{choice.key}-{gallery.key}"
    built = timings.run("index", lambda: ensure_index(fp32.onnx, gallery, index_dir))
    say(f"index:   {'built' if built else 'cached'} at {index_dir}")
    served = fp32 if opts.precision == "fp32" else timings.run(opts.precision, lambda: served_model(
        choice, opts.precision, index=index_dir, calibration=opts.calibration, min_recall=opts.min_recall,
        cache=opts.cache, refresh=opts.refresh))
    say(f"encoder: {served.description}")
    return Prepared(served, served.onnx, gallery, index_dir)


def ensure_index(onnx_path: Path, gallery: Gallery, index_dir: IndexSpec) -> bool:
    """Build the gallery index unless it exists; returns True when it was built now."""
    from ascl.serving.online.gallery import build_index, index_exists

    if index_exists(index_dir):
        return False
    build_index(onnx_path, gallery.root, index_dir)
    return True


def run_up(opts: UpOptions) -> int:
    """The whole of ``ascl up``; returns the exit code."""
    from ascl.demo.app import build_app, close, launch, quiet_gradio
    from ascl.serving.online.gallery import ServerError, TritonGallery
    from ascl.serving.online.serve import check_ports_free, start_service

    quiet_gradio()
    timings = Timings()
    check_ports_free(opts.ports.by_flag())  # once, before any slow step
    os.environ["ASCL_CACHE"] = str(opts.cache)  # serving's own caches (Triton backends) go there too
    # importing gradio takes seconds: do it while the main thread prepares and starts Triton
    gradio_import = threading.Thread(target=importlib.import_module, args=("gradio",), daemon=True)
    gradio_import.start()
    with terminate_on_sigterm(), ExitStack() as stack:
        try:
            served, _, gallery, index_dir = prepare(opts, timings)
            choice = served.choice
            say("triton:  starting ...")
            workdir = opts.cache / "triton"
            name = index_name(index_dir)
            server = timings.run("triton", lambda: start_service(
                served, index_dir, workdir / name, grpc_port=opts.ports.grpc, http_port=opts.ports.http,
                metrics_port=opts.ports.metrics, log_path=workdir / f"{name}.log"))
            stack.callback(_stopping, "Triton", server.stop)
            grpc_url = f"127.0.0.1:{opts.ports.grpc}"
            backend = TritonGallery(grpc_url, index_dir)
            subtitle = (f"Model: {choice.description}, at {served.facts.image_size}x{served.facts.image_size} px "
                        f"({served.precision}). Gallery: {gallery.description}."
                        + (f"\n\n**{choice.warning}**" if choice.warning else ""))
            gradio_import.join()
            app = build_app(backend, example_files(index_dir), subtitle=subtitle,
                            quota=AddQuota(opts.max_adds_per_client, opts.max_adds))
            stack.callback(_stopping, "demo", lambda: close(app))
            url = timings.run("demo", lambda: launch(app, opts.ports.demo, allowed_paths=gallery_roots(index_dir)))
            _print_ready(url, opts.ports, timings)
            failure = server.wait()  # returns only when the service stopped by itself; Ctrl-C interrupts it
            if failure:
                raise ServerError(failure)  # exit 1 with the reason, after the page and Triton are stopped
        except KeyboardInterrupt:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a second Ctrl-C must not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
            say("\nstopping ...")
    say("stopped; nothing left running.")
    return 0


def _stopping(name: str, stop: Callable[[], Any]) -> None:
    say(f"stopping {name} ...")
    stop()


def _print_ready(url: str, ports: Ports, timings: Timings) -> None:
    steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.steps.items())
    say(f"\nready in {timings.total():.1f} s ({steps})")
    say(f"  demo:     {url}")
    say(f"  gRPC:     127.0.0.1:{ports.grpc}   (ascl query IMAGE --server 127.0.0.1:{ports.grpc})")
    say(f"  HTTP:     http://127.0.0.1:{ports.http}/v2/health/ready")
    say(f"  metrics:  http://127.0.0.1:{ports.metrics}/metrics")
    say("Press Ctrl-C to stop.")
