"""The front door's share of a request: `ascl serve` through its public ports and straight to its
Triton, side by side in one run, and (``--compare-ref``) the same for another revision's front door.

`ascl serve` runs as its own process: the front door (gRPC and HTTP, with every limit and check)
and the supervisor are all the CPU that process spends, while the encoder and the Python models
run in the `tritonserver` processes below it. For each protocol and concurrency a load client (in
its own process) sends one-image searches (k=10) for ``--duration`` seconds, alternately through
the front door and straight to Triton's private port, ``--rounds`` times. Per request:

  * ``door_cpu_us``: CPU of the `ascl serve` process (its idle rate, supervisor probes included,
    measured for a few seconds without traffic, taken off);
  * ``triton_cpu_us``: CPU of `tritonserver` and its stubs;
  * ``door_share``: door_cpu / (door_cpu + triton_cpu), the part of the server's work the front door is;
  * ``added_p50_ms``: median latency through the door minus straight to Triton; ``qps_ratio``: q/s
    through the door / straight.

With ``--compare-ref REV`` the same runs against REV's code (a `git archive` of it, imported from a
temporary tree; the model repository and the index are the same), so ``summary.door_cpu_ratio``
is this front door's CPU per request over REV's: the figure for "a fraction of today's cost".
A row ``http_gzip`` sends gzip-compressed HTTP requests through the door (its inflating cost).

    python benchmarks/front_door.py --compare-ref main                  # ~6 min at the defaults
    python benchmarks/front_door.py --duration 2 --rounds 1 --levels 1 --gallery 200   # a smoke test

Writes ``benchmarks/results/front_door.json`` (machine, SIMD flags, load average, command).
Quote figures from a quiet machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ascl import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load's load loop
PACKAGE_DIRS = ("training", "export", "serving", "demo", "model_cards")  # mapped into `ascl` (pyproject)


# ---------------------------------------------------------------- the load client (its own process)

async def drive(protocol: str, url: str, images: list[bytes], concurrency: int, duration: float,
                compression: str | None) -> dict[str, Any]:
    """``concurrency`` workers send back-to-back one-image searches for ``duration`` seconds
    (``serve_load.drive``'s closed loop, over gRPC or HTTP, optionally compressed)."""
    from serve_load import drive as closed_loop

    from ascl import names

    if protocol == "grpc":
        import tritonclient.grpc as mod
        import tritonclient.grpc.aio as aio
    else:
        import tritonclient.http as mod  # type: ignore[no-redef]
        import tritonclient.http.aio as aio  # type: ignore[no-redef]
    client = aio.InferenceServerClient(url)

    async def send(data: bytes) -> None:
        image = mod.InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        k = mod.InferInput(names.TOP_K, [1, 1], "INT32")
        k.set_data_from_numpy(np.array([[10]], dtype=np.int32))
        extra = {"request_compression_algorithm": compression} if compression else {}
        result = await client.infer(names.MODEL_IMAGE_SEARCH, [image, k], **extra)
        assert result.as_numpy(names.IDS).shape == (1, 10)

    try:
        return await closed_loop(send, images, concurrency, duration)
    finally:
        await client.close()


def read_queries(path: Path) -> list[bytes]:
    """Images written by ``write_queries``: a 4-byte little-endian length before each."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "little")
        out.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return out


def write_queries(images: list[bytes], path: Path) -> Path:
    path.write_bytes(b"".join(len(b).to_bytes(4, "little") + b for b in images))
    return path


def client_main(args: argparse.Namespace) -> int:
    images = read_queries(Path(args.queries_file))
    asyncio.run(drive(args.client_protocol, args.client, images, args.concurrency, args.warmup, args.compression))
    row = asyncio.run(drive(args.client_protocol, args.client, images, args.concurrency, args.duration,
                            args.compression))
    print(json.dumps(row))
    return 0


# ---------------------------------------------------------------- the service (its own process)

def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own threads, not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of ``root`` and every live process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    total, frontier = 0.0, {root}
    while frontier:
        for pid in frontier:
            with contextlib.suppress(OSError, IndexError):  # gone meanwhile
                total += cpu_seconds(pid)
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source_tree(ref: str, tmp: Path) -> tuple[Path, str]:
    """REV's code as an importable ``ascl`` package under ``tmp`` (git archive, the package folders
    linked in as pyproject maps them); returns (the folder to put on PYTHONPATH, the commit)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = tmp / f"src-{commit[:10]}"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    pkg = tmp / f"pkg-{commit[:10]}" / "ascl"
    pkg.mkdir(parents=True)
    for file in (tree / "ascl").glob("*.py"):
        (pkg / file.name).write_bytes(file.read_bytes())
    for folder in PACKAGE_DIRS:
        (pkg / folder).symlink_to(tree / folder)
    return pkg.parent, commit


class Served:
    """`ascl serve` of one code version on the shared model and index."""

    def __init__(self, label: str, model: str, index: Path, repo: Path, pythonpath: Path | None, workdir: Path) -> None:
        self.label = label
        self.ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        cmd = [sys.executable, "-m", "ascl", "serve", "--model", model, "--index", str(index), "--repository",
               str(repo), "--grpc-port", str(self.ports["grpc"]), "--http-port", str(self.ports["http"]),
               "--metrics-port", str(self.ports["metrics"])]
        # cwd: the interpreter puts it first on sys.path, so a checkout there would shadow PYTHONPATH
        self.process = subprocess.Popen(cmd, env=env, cwd=pythonpath or workdir, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("ready:"):
                break
        else:
            raise RuntimeError(f"ascl serve ({label}) exited with {self.process.wait()} before it was ready")
        self.triton_pid, self.private = self._triton()

    def _triton(self) -> tuple[int, dict[str, int]]:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.process.pid and argv[0].endswith("tritonserver"):
                opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
                return int(entry.name), {"grpc": int(opts["grpc-port"]), "http": int(opts["http-port"])}
        raise RuntimeError("no tritonserver below ascl serve")

    def url(self, protocol: str, door: bool) -> str:
        port = self.ports[protocol] if door else self.private[protocol]
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(served: Served, protocol: str, door: bool, concurrency: int, queries: Path, args: argparse.Namespace,
            idle_rate: float, compression: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--client", served.url(protocol, door), "--client-protocol", protocol,
           "--queries-file", str(queries), "--concurrency", str(concurrency), "--duration", str(args.duration),
           "--warmup", str(args.warmup)] + (["--compression", compression] if compression else [])
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.warmup)  # CPU counted from the end of the client's warm-up
    door0, triton0, began = cpu_seconds(served.process.pid), tree_cpu_seconds(served.triton_pid), time.monotonic()
    out, err = client.communicate(timeout=args.duration + args.warmup + 300)
    elapsed = time.monotonic() - began
    door_cpu = cpu_seconds(served.process.pid) - door0 - idle_rate * elapsed
    triton_cpu = tree_cpu_seconds(served.triton_pid) - triton0
    if client.returncode != 0:
        raise RuntimeError(f"load client failed: {err[-2000:]}")
    row = dict(json.loads(out.strip().splitlines()[-1]))
    n = max(1, row["requests"])
    row.update(door_cpu_us=round(door_cpu / n * 1e6, 1), triton_cpu_us=round(triton_cpu / n * 1e6, 1))
    return row


def run_version(served: Served, args: argparse.Namespace, queries: Path) -> dict[str, Any]:
    time.sleep(2)
    idle0, t0 = cpu_seconds(served.process.pid), time.monotonic()
    time.sleep(args.idle)
    idle_rate = (cpu_seconds(served.process.pid) - idle0) / (time.monotonic() - t0)
    rows: dict[str, Any] = {"idle_cpu_percent": round(idle_rate * 100, 2)}
    for protocol in args.protocols:
        for c in args.levels:
            door_runs, direct_runs = [], []
            for _ in range(args.rounds):  # alternate, so that a change in the machine's load hits both
                door_runs.append(measure(served, protocol, True, c, queries, args, idle_rate))
                direct_runs.append(measure(served, protocol, False, c, queries, args, idle_rate))
            rows[f"{protocol}_c{c}"] = summarize(door_runs, direct_runs)
    if "http" in args.protocols:
        c = args.levels[len(args.levels) // 2]
        runs = [measure(served, "http", True, c, queries, args, idle_rate, "gzip") for _ in range(args.rounds)]
        rows[f"http_gzip_c{c}"] = {"door": mean_row(runs)}
    return rows


def mean_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("qps", "p50_ms", "p99_ms", "door_cpu_us", "triton_cpu_us")
    out: dict[str, Any] = {k: round(float(np.mean([r[k] for r in runs])), 2) for k in keys}
    out.update(requests=sum(r["requests"] for r in runs), errors=sum(r["errors"] for r in runs),
               first_error=next((r["first_error"] for r in runs if r["first_error"]), ""))
    return out


def summarize(door_runs: list[dict[str, Any]], direct_runs: list[dict[str, Any]]) -> dict[str, Any]:
    door, direct = mean_row(door_runs), mean_row(direct_runs)
    server_cpu = door["door_cpu_us"] + door["triton_cpu_us"]
    return {"door": door, "direct": direct,
            "door_share": round(door["door_cpu_us"] / server_cpu, 3) if server_cpu > 0 else None,
            "added_p50_ms": round(door["p50_ms"] - direct["p50_ms"], 2),
            "qps_ratio": round(door["qps"] / direct["qps"], 3) if direct["qps"] else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ascl.image_sources import iter_images
    from ascl.serving.collections.build import build_index
    from ascl.serving.collections.model_files import resolve_onnx

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx = resolve_onnx(args.model)
        build_index(onnx, args.images, tmp / "idx", limit=args.gallery, progress=False)
        items = list(iter_images(args.images, limit=args.gallery + 64))[-64:]  # queries: not in the gallery
        queries = write_queries([item.read() for item in items], tmp / "queries.bin")
        versions: list[tuple[str, Path | None, str]] = [("current", None, "working tree")]
        if args.compare_ref:
            path, commit = source_tree(args.compare_ref, tmp)
            versions.append((f"ref:{args.compare_ref}", path, commit))
        results: dict[str, Any] = {}
        for label, path, commit in versions:
            served = Served(label, str(onnx), tmp / "idx", tmp / f"repo-{len(results)}", path, tmp)
            try:
                results[label] = {"code": commit, **run_version(served, args, queries)}
            finally:
                served.stop()
    record: dict[str, Any] = {
        "benchmark": "front_door", "machine": {"cpu": machine.cpu_name(), "cpu_simd": machine.cpu_simd_flags(),
                                               "cores": os.cpu_count()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "setup": {"model": args.model, "images": args.images, "gallery": args.gallery, "levels": args.levels,
                  "protocols": args.protocols, "duration_s": args.duration, "rounds": args.rounds},
        "results": results,
    }
    if args.compare_ref:  # rows that failed in either version (REV may not take gzip at all) are left out
        ref = results[f"ref:{args.compare_ref}"]
        record["summary"] = {"door_cpu_ratio": {
            key: round(row["door"]["door_cpu_us"] / ref[key]["door"]["door_cpu_us"], 3)
            for key, row in results["current"].items()
            if isinstance(row, dict) and "door" in row and key in ref and not row["door"]["errors"]
            and not ref[key]["door"]["errors"] and ref[key]["door"]["door_cpu_us"] > 0}}
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="any model 'ascl serve --model' accepts")
    p.add_argument("--images", default="cifar10-offline", help="gallery and query source")
    p.add_argument("--gallery", type=int, default=1000, help="images in the served index")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="client concurrency levels")
    p.add_argument("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each run")
    p.add_argument("--rounds", type=int, default=2, help="door / direct alternations per level")
    p.add_argument("--idle", type=float, default=5.0, help="seconds without traffic to measure the idle CPU")
    p.add_argument("--compare-ref", default=None, metavar="REV",
                   help="also measure this git revision's front door (e.g. main, or the commit before a change)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "front_door.json"))
    # the client process
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--client-protocol", default="grpc", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--compression", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_main(args)
    from ascl.atomic import atomic_write_text

    record = run(args)
    record["command"] = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["front_door.py", *argv])
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("results", "summary") if k in record}, indent=2))
    print(f"-> {args.out}")
    failed = any(row["door"]["errors"] for row in record["results"]["current"].values()
                 if isinstance(row, dict) and "door" in row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
