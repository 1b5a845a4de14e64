"""The tritonserver of the nvidia-pytriton wheel, started on a model repository (`slimengine serve`, tests, benchmark).

The wheel ships a real `tritonserver` binary, its libraries (nvidia_pytriton.libs), the Python backend and one backend
stub per Python version. Three things make it run the repository's Python models in *this* interpreter's environment:
- a backend directory with the stub for this Python version in `python/` (copied there, as PyTriton does);
- LD_LIBRARY_PATH with this interpreter's LIBDIR (the stub links libpython3.X.so) and the wheel's libraries;
- PATH starting with this interpreter's bin directory: the stub's embedded interpreter finds its prefix from the
  `python3` on PATH, so a virtual environment's site-packages (slimengine, numpy) are the ones it imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

INSTALL_HINT = "pip install 'slimengine[serve]' (nvidia-pytriton==0.7.0 ships tritonserver)"
# How many times `slimengine serve` restarted a crashed tritonserver before starting this one: set in the server's
# environment, read by every model (backend.py), which publishes it as the slimengine_server_restarts metric.
RESTARTS_ENV = "SLIMENGINE_SERVER_RESTARTS"


class ServerError(RuntimeError):
    pass


def pytriton_dist() -> tuple[Path, Path]:
    """(the wheel's tritonserver directory, its bundled libraries), or ServerError saying what to install."""
    spec = importlib.util.find_spec("pytriton")  # located, not imported (importing pytriton pulls in much more)
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"tritonserver not found: the nvidia-pytriton package is not installed; {INSTALL_HINT}, or run the "
                          "repository in NVIDIA's Triton container (docs/serving.md)")
    package = Path(list(spec.submodule_search_locations)[0])
    server_dir, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise ServerError(f"{server_dir}/bin/tritonserver is missing: reinstall nvidia-pytriton ({INSTALL_HINT})")
    return server_dir, libs


def python_libdir() -> Path:
    """This interpreter's shared libpython's directory (the backend stub links it)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / name).exists():
        raise ServerError(f"this Python ({sys.executable}) has no shared {name} in {libdir}: Triton's Python-backend stub links "
                          "it; use a Python built with --enable-shared (Debian's python3, pyenv with "
                          "PYTHON_CONFIGURE_OPTS=--enable-shared, conda)")
    return libdir


def prepare_backends(dest: Path) -> Path:
    """A backend directory for this Python: the wheel's backends with the matching stub in python/."""
    server_dir, _ = pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version} (it has "
                          f"{sorted(p.name for p in (server_dir / 'python_backend_stubs').iterdir())})")
    shutil.copytree(server_dir / "backends", dest, dirs_exist_ok=True)
    shutil.copy2(stub, dest / "python" / "triton_python_backend_stub")
    return dest


def server_env() -> dict:
    _, libs = pytriton_dist()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(python_libdir()), str(libs), env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (even by SIGKILL), so that a killed
    `slimengine serve` or test run never leaves a tritonserver behind (its stubs exit when it does). The kernel ties
    this to the *thread* that forked, so it is set only for a start from the main thread (start())."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver on `repository`, bound to `host` (loopback by default). Ports 0: free ones are picked.

    model_control: "none" (every model loaded at start) or "explicit" (load/unload through the repository API; `models`
    are loaded at start). Use as a context manager, or start() / stop(). Started from the main thread, the server is
    killed with the process however it ends; started from another thread, only stop() ends it."""

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, model_control: str = "none", models: list[str] | None = None, log_file: str | Path | None = None,
                 extra_args: list[str] | None = None, exit_timeout: int = 30):
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.model_control, self.models, self.extra_args = model_control, models or [], extra_args or []
        self.log_file = Path(log_file) if log_file else None
        self.exit_timeout = exit_timeout  # Triton's own grace for in-flight requests when stopped; stop() kills after it
        self.restarts = 0  # set by a supervisor (slimengine serve) before a restart: published as a metric
        # Our server's --id, checked by ready(): another server already on the HTTP port answers health checks too, and
        # this one would be taken for ready just before it exits for want of the port.
        self.server_id = f"slimengine-{uuid.uuid4().hex[:12]}"
        # The Python backend's shared-memory regions (/dev/shm) get this prefix: a server that crashed leaves them
        # behind, and stop() removes exactly ours.
        self.shm_prefix = f"{self.server_id}-shm-"
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        server_dir, _ = pytriton_dist()
        cmd = [str(server_dir / "bin" / "tritonserver"), "--model-repository", str(self.repository), "--backend-directory", str(backends),
               "--http-address", self.host, "--http-port", str(self.http_port), "--grpc-address", self.host,
               "--grpc-port", str(self.grpc_port), "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
               "--model-control-mode", self.model_control, "--exit-timeout-secs", str(self.exit_timeout), "--id", self.server_id,
               "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}"]
        for model in self.models:
            cmd += ["--load-model", model]
        return cmd + self.extra_args

    def start(self, timeout: float = 120) -> TritonServer:
        self._workdir = tempfile.TemporaryDirectory(prefix="slimengine-triton-")
        backends = prepare_backends(Path(self._workdir.name) / "backends")
        if self.log_file is None:
            self.log_file = Path(self._workdir.name) / "tritonserver.log"
        env = dict(server_env(), **{RESTARTS_ENV: str(self.restarts)})
        with open(self.log_file, "ab") as log:
            # Its own process group (the stubs join it): stop() kills the whole group
            # PR_SET_PDEATHSIG fires when the forking thread ends: from another thread the server would be killed with
            # that thread, so there it is not set and stop() (or the context manager) is the caller's job alone.
            main = threading.current_thread() is threading.main_thread()
            self.process = subprocess.Popen(self.command(backends), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent if main else None)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-chars:]
        return ""

    def log_errors(self, limit: int = 20) -> str:
        """Triton's error lines (E...): why a model failed to load, or a port was busy. The log's tail alone is often
        the settings table Triton prints after them."""
        with contextlib.suppress(OSError):
            lines = [line for line in self.log_file.read_text(errors="replace").splitlines() if line.startswith("E")]
            return "\n".join(lines[-limit:])
        return ""

    def failure(self, what: str) -> ServerError:
        """`what`, with Triton's error lines (or the log's tail when it has none)."""
        return ServerError(f"{what}:\n{self.log_errors() or self.log_tail()}")

    def ready(self) -> bool:
        """This server (not another one on the same port) answers and is ready."""
        # One keep-alive connection, closed by us: a connection the server closes first (urllib's "Connection: close")
        # leaves a TIME_WAIT on the server's port, and the port cannot be bound again for a minute after the server stops.
        connection = http.client.HTTPConnection(self.host, self.http_port, timeout=2)
        try:
            connection.request("GET", "/v2")
            response = connection.getresponse()
            if response.status != 200 or json.loads(response.read()).get("name") != self.server_id:
                return False
            connection.request("GET", "/v2/health/ready")
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_status()
            if code is not None:
                raise self.failure(f"tritonserver exited with status {code} while starting")
            if self.ready():
                return
            time.sleep(0.2)
        raise self.failure(f"tritonserver not ready after {timeout:.0f} s")

    def exit_status(self) -> int | None:
        """None while the server runs, else its exit status (negative: the signal that ended it), as Popen gives it. The
        process is left unreaped (a zombie), so its pid, the id of its process group, stays ours until stop() has
        killed what is left of the group (Popen.poll() would reap it)."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return self.process.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton finishes in-flight requests, unloads the models), and after `timeout` (default: Triton's exit
        timeout + 10 s) or once the server has ended, SIGKILL to its whole process group (a hung server, the stubs of a
        crashed one); then the server is reaped and its shared memory removed. Returns the exit status (negative: the
        signal). Bounded: never waits past `timeout`."""
        code = None
        if self.process is not None:
            if self.exit_status() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + (self.exit_timeout + 10 if timeout is None else timeout)
                while self.exit_status() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
            if self.process.returncode is None:  # not reaped yet: the group's id is still ours
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
            for region in glob.glob(f"/dev/shm/{glob.escape(self.shm_prefix)}*"):
                with contextlib.suppress(OSError):
                    os.unlink(region)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
