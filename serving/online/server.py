"""Start and stop the `tritonserver` that ships in nvidia-pytriton, on a model repository of ours.

The pytriton wheel carries Triton 2.51 with the Python backend only. Started directly it needs
the backend folder with the Python 3.11 stub copied in (we prepare a copy once under the ascl
cache instead of writing into site-packages), ``LD_LIBRARY_PATH`` reaching libpython and the
wheel's bundled libraries, and ``PYTHONPATH`` reaching this venv's site-packages so the Python
models can import numpy, faiss and onnxruntime.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from ascl.cache import cache_dir
from ascl.errors import FAILURE, USAGE, AsclError


class ServerError(AsclError, RuntimeError):
    """The server could not start or stopped unexpectedly; the message says why."""

    exit_code = FAILURE


class PortInUseError(ServerError):
    """A port a server should listen on is taken (or asked for twice); ``name`` says which one."""

    exit_code = USAGE

    def __init__(self, message: str, *, name: str = "", host: str = "", port: int = 0) -> None:
        super().__init__(message)
        self.name, self.host, self.port = name, host, port


def pytriton_root() -> Path:
    """The installed pytriton package folder (holds tritonserver/ and the stubs)."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("nvidia-pytriton is not installed: pip install 'ascl-hub[serve]'") from exc
    return Path(pytriton.__file__).resolve().parent


def prepared_backends() -> Path:
    """A backends folder with the Python stub of this interpreter copied in (made once, cached)."""
    root = pytriton_root()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"{stub}: no Triton Python backend stub for Python {version}")
    dest = cache_dir() / f"tritonserver-backends-py{version}-{int(stub.stat().st_mtime)}"
    if (dest / "python" / "triton_python_backend_stub").is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".backends.", dir=dest.parent if dest.parent.exists() else None))
    shutil.copytree(root / "tritonserver" / "backends", tmp / "b", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, tmp / "b" / "python" / "triton_python_backend_stub")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # another process prepared it first
        os.rename(tmp / "b", dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


STUB_NUMPY = "numpy>=1.26,<2"
# pymilvus (the Milvus index backend) imports pandas, whose 3.x wheels need NumPy 2: the stub env then
# holds a pandas that works with NumPy 1.26 too.
STUB_PANDAS = ("pandas>=2.2,<3", "pytz")


def stub_packages() -> tuple[str, ...]:
    """What the stub env installs ahead of this venv: NumPy 1.x, and pandas 2.x where pymilvus is installed."""
    import importlib.util

    return (STUB_NUMPY, *STUB_PANDAS) if importlib.util.find_spec("pymilvus") is not None else (STUB_NUMPY,)


def prepared_stub_env() -> Path | None:
    """A tiny venv whose ``bin/python`` the stubs find first on PATH, with numpy < 2 ahead of ours.

    The Python backend stub in nvidia-pytriton 0.5.7 is built with a pybind11 that predates
    NumPy 2: with NumPy 2 it misreads every dtype's item size, so ``as_numpy()`` returns zeros,
    outputs arrive empty and TYPE_STRING tensors are garbage. The stub takes its ``sys.path``
    from the ``python`` first on PATH (PYTHONPATH is ignored), so we point it at a venv holding
    NumPy 1.26 whose ``.pth`` file then appends this venv's site-packages (faiss, onnxruntime and
    Pillow work with NumPy 1.26). Made once, under the ascl cache; ``None`` when NumPy < 2 here.
    """
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        return None
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    packages = stub_packages()
    dest = cache_dir() / f"triton-stub-env-py{version}{'-pandas' if len(packages) > 1 else ''}"
    site_dir = dest / "lib" / f"python{version}" / "site-packages"
    if (site_dir / "ascl_venv.pth").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".stub-env.", dir=dest.parent))
    try:
        tmp_site = tmp / "lib" / f"python{version}" / "site-packages"
        tmp_site.mkdir(parents=True)
        (tmp / "bin").mkdir()
        base = Path(sys.base_prefix) / "bin" / f"python{version}"
        (tmp / "bin" / "python").symlink_to(base)
        (tmp / "bin" / "python3").symlink_to("python")
        (tmp / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp_site), *packages],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ServerError(
                f"could not install {' '.join(packages)!r} for the Triton Python stub (needed with NumPy 2, see "
                f"serving/online/server.py): {result.stderr.strip()[-500:]}"
            )
        (tmp_site / "ascl_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        os.rename(tmp, dest)
    except OSError:
        if not (site_dir / "ascl_venv.pth").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the server itself: ports in TIME_WAIT from our own readiness polls are free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def server_env() -> dict[str, str]:
    """Environment for tritonserver and its Python stubs."""
    env = os.environ.copy()
    libs = [str(sysconfig.get_config_var("LIBDIR")), str(pytriton_root().parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    stub_env = prepared_stub_env()
    python_bin = stub_env / "bin" if stub_env else Path(sys.executable).parent
    env["PATH"] = f"{python_bin}:{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the stub ignores it; keep tritonserver's own environment clean
    env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """SIGTERM the server if the launching process dies, so nothing is left behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@functools.lru_cache(maxsize=1)
def die_with_parent_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig TERM --`` (util-linux): the command it runs gets SIGTERM when the
    process (strictly, the thread) that launched it dies. ``()`` where setpriv is missing or
    lacks the option; then ``launch`` falls back to a ``preexec_fn``.

    Why not always the ``preexec_fn``: with one, subprocess must fork() the whole parent and run
    Python in the child before exec. In a large process with dozens of threads (gRPC's among
    them) that child can deadlock or crash: restarts from the supervisor thread of a long-running
    process died with SIGSEGV before tritonserver ever ran. Without one, subprocess uses vfork
    and execs at once."""
    path = shutil.which("setpriv")
    if path is None:
        return ()
    prefix = (path, "--pdeathsig", "TERM", "--")
    try:
        works = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        works = False
    return prefix if works else ()


def launch(command: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command)`` in a new session, SIGTERMed if the launching thread dies."""
    prefix = die_with_parent_prefix()
    return subprocess.Popen([*prefix, *command], start_new_session=True,
                            preexec_fn=None if prefix else _die_with_parent, **popen_kwargs)


def exit_status(code: int | None) -> str:
    """``code 1``, or ``killed by SIGSEGV`` for a process a signal ended (Popen's negative codes)."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


# Error lines a CPU-only Triton writes on every start; they are not the cause of anything.
CPU_ONLY_NOISE = ("CudaDriverHelper", "CUDA driver", "unable to create stream")
LOAD_FAILURE = re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?:\w+: )?(?P<cause>.*)")

# APIs that only an operator holding the admin key may call (header ADMIN_KEY_HEADER); the
# model-repository API cannot load or unload anything at all (model control mode "none").
RESTRICTED_APIS = ("model-repository", "model-config", "statistics", "trace", "logging", "shared-memory")
ADMIN_KEY_HEADER = "ascl-admin-key"


def check_ports_free(ports: dict[str, int], host: str, metrics_host: str | None = None) -> None:
    """PortInUseError (a ServerError) naming the first of ``ports`` (name -> port) that something listens on."""
    for name, port in ports.items():
        where = metrics_host if name == "metrics" and metrics_host else host
        if port_in_use(where, port):
            raise PortInUseError(f"{where}:{port} ({name} port) is already in use; stop what listens there or pick "
                                 f"another with --{name}-port", name=name, host=where, port=port)


def client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


class ServerUrls:
    """``grpc_url``, ``http_url`` and ``metrics_url`` of a server with ``host``, ``metrics_host``, ``ports``."""

    host: str
    metrics_host: str
    ports: dict[str, int]

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.host)}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{client_host(self.metrics_host)}:{self.ports['metrics']}/metrics"


class TritonServer(ServerUrls):
    """A tritonserver process serving ``repository``, usable as a context manager.

    Every model is loaded at start and none can be loaded or unloaded later (model control
    mode ``none``); the repository, config, statistics, trace, logging and shared-memory APIs
    answer only requests that carry ``ascl-admin-key: <admin_key>`` (a random key unless one is
    given). ``start()`` checks the ports, launches the server and waits until it reports ready;
    ``stop()`` sends SIGTERM and kills it if it has not exited within ``exit_timeout_s``. For
    a server that drains in-flight requests, restarts after a crash and bounds request sizes,
    use ``ascl.serving.online.service.SearchService``, which runs this one behind its front door.
    """

    def __init__(
        self, repository: str | Path, *, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
        host: str = "127.0.0.1", exit_timeout_s: int = 30, log_path: str | Path | None = None,
        verbose: bool = False, admin_key: str | None = None, metrics_host: str | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.host = host
        self.metrics_host = metrics_host or host
        self.exit_timeout_s = exit_timeout_s
        self.verbose = verbose
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.shm_prefix = f"ascl_{os.getpid()}_{uuid.uuid4().hex[:8]}_"  # the stubs' /dev/shm regions
        self.log_path = Path(log_path) if log_path else None
        self._own_log = log_path is None  # a temporary log we remove after a clean stop
        self.process: subprocess.Popen[bytes] | None = None
        self.stubs_at_start: set[int] = set()
        self.last_errors = ""  # the error lines of the log of a server that did not exit cleanly

    def command(self) -> list[str]:
        """The tritonserver command line."""
        binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        prefix = self.shm_prefix
        return [
            str(binary), f"--model-repository={self.repository}", f"--backend-directory={prepared_backends()}",
            f"--grpc-port={self.ports['grpc']}", f"--http-port={self.ports['http']}",
            f"--metrics-port={self.ports['metrics']}", f"--grpc-address={self.host}",
            f"--http-address={self.host}", f"--metrics-address={self.metrics_host}", "--allow-metrics=true",
            "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}", "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name={prefix}", f"--log-verbose={1 if self.verbose else 0}",
            "--model-control-mode=none",  # everything loads at start; nothing loads or unloads afterwards
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={self.admin_key}",
        ]

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        """Launch and wait until ready; raises ServerError with the log tail on failure."""
        if not (self.repository / "").is_dir():
            raise ServerError(f"{self.repository}: no such model repository")
        check_ports_free(self.ports, self.host, self.metrics_host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver.", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with open(self.log_path, "wb") as log:
            self.process = launch(
                self.command(), env=server_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.repository,  # the stubs put the cwd first on sys.path: keep a source checkout out
            )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop(kill=True)  # the message holds what its log said; a temporary log goes with it
            raise
        self.stubs_at_start = self.stub_pids()  # every model is loaded: these are all the stubs it runs
        return self

    def errors(self) -> str:
        """The error lines of the server log (model load failures and the like), without the CUDA
        lines that a CPU-only Triton always writes."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if (line.startswith("E") or "rror" in line[:200])
                         and not any(noise in line for noise in CPU_ONLY_NOISE))[-6000:]

    def load_failures(self) -> list[str]:
        """One line per model that failed to load: ``model 'search': <the cause, naming the file>``."""
        found: dict[str, str] = {}
        for line in self.errors().splitlines():
            match = LOAD_FAILURE.search(line)
            if match:
                found.setdefault(match["model"], match["cause"].strip().rstrip('"'))
        return [f"model {model!r}: {cause}" for model, cause in found.items()]

    def failure_report(self) -> str:
        """The log's error lines, then one last line with the cause: what a failed start says."""
        failures = self.load_failures()
        errors = self.errors()
        last = (f"could not load {failures[0]}" if len(failures) == 1 else
                "could not load " + "; ".join(failures) if failures else
                "see the errors above" if errors else "its log holds no error line (it ended before writing one)")
        return (errors + "\n" if errors else "") + last

    def logs(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def is_ready(self) -> bool:
        """Triton's own readiness endpoint answers 200."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until ready; ServerError if the process exits or time runs out (its message ends
        with the cause: the model that failed to load and why, naming the file)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                where = "" if self._own_log else f" (log: {self.log_path})"
                raise ServerError(f"tritonserver exited ({exit_status(code)}) before it was ready{where}:\n"
                                  f"{self.failure_report()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; log:\n{self.logs()}")

    def is_live(self, timeout_s: float = 2.0) -> bool:
        """Triton's liveness endpoint answers 200 within ``timeout_s`` (a hung or stopped server does not)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/live", timeout=timeout_s) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def state(self) -> str:
        """The process state letter from /proc (R, S, D, T when stopped by SIGSTOP, Z...); "" when unknown."""
        proc = self.process
        if proc is None:
            return ""
        try:
            return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return ""

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        return -1 if self.process is None else self.process.wait()

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stub_pids(self) -> set[int]:
        """Live (not zombie) child processes of the server: its Python backend stubs (Linux /proc)."""
        proc = self.process
        if proc is None:
            return set()
        live = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
                if int(fields[1]) == proc.pid and fields[0] not in ("Z", "X"):
                    live.add(int(stat.parent.name))
        return live

    def lost_stubs(self) -> set[int]:
        """Stubs that were running when the server became ready and are gone now. Triton may start
        a new one itself, but requests that were inside the dead one never answer."""
        return self.stubs_at_start - self.stub_pids()

    def stop(self, *, kill: bool = False) -> int | None:
        """SIGTERM and wait (SIGKILL after the exit timeout, or at once with ``kill``: for a
        server that is broken anyway); returns the exit code. A server that did not exit
        cleanly has its stubs and their /dev/shm regions removed too."""
        proc = self.process
        if proc is None:
            return None
        self.process = None
        if proc.poll() is None:
            if not kill:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(self.exit_timeout_s + 10)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs a crashed server left behind
            self.remove_shared_memory()
            self.last_errors = self.errors()[-2000:]
        if self._own_log and self.log_path is not None:  # a temporary file: nothing left in /tmp
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    def remove_shared_memory(self) -> None:
        """Delete the stubs' /dev/shm regions (a killed or crashed server cannot do it itself)."""
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
