"""A real Triton Inference Server on loopback: the ``tritonserver`` that PyPI's nvidia-pytriton
ships (Triton 2.51 with its Python backend only), serving a repository written by
``brainmets export --triton REPO --triton-backend python``.

Only the server's files are used, not pytriton's Python API: the wheel is installed with
``pip install --no-deps nvidia-pytriton`` (its numpy<2 pin is for that API). The Python backend
runs model.py in a stub process that embeds this interpreter's Python: the stub finds this
environment's packages (numpy, onnxruntime) through ``python3`` first on PATH, and its
libpython through LD_LIBRARY_PATH. gRPC listens on 127.0.0.1 at a free port; HTTP and metrics
are off, so nothing else listens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def _pytriton() -> Path | None:
    # find_spec locates the package without importing it (its API needs numpy<2).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _libpython_dir() -> Path | None:
    """The folder of this interpreter's shared libpython, for the backend stub to load the same
    Python (None: the stub falls back to the system's, if any)."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and name and name.endswith(".so") and Path(libdir, name).is_file():
        return Path(libdir)
    return None


def missing() -> str | None:
    """Why no Triton server can run here, or None."""
    root = _pytriton()
    if root is None:
        return "nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton)"
    if not (root / "tritonserver" / "bin" / "tritonserver").is_file():
        return f"{root}: no tritonserver binary in this nvidia-pytriton"
    stub = root / "tritonserver" / "python_backend_stubs" / _python_version()
    if not (stub / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton has no Python backend stub for Python {_python_version()}"
    if _libpython_dir() is None and not ctypes.util.find_library(f"python{_python_version()}"):
        return f"no shared libpython{_python_version()} for Triton's Python backend stub"
    for package in ("onnxruntime", "tritonclient.grpc"):
        if importlib.util.find_spec(package.split(".")[0]) is None:
            return f"{package} is not installed (the served model and the client need it)"
    return None


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so that a test
    run killed outright leaves no server behind (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` serving ``repository``; ``start()`` returns once every model is ready.

    ``url`` is the gRPC host:port; ``log`` its output. Stop it with ``stop()`` (or use it as a
    context manager): SIGTERM, then SIGKILL after a bounded wait.
    """

    def __init__(
        self, repository: Path, work: Path | None = None, *, startup_timeout: float = 180.0
    ) -> None:
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        self.repository = Path(repository)
        self.startup_timeout = startup_timeout
        self._root = _pytriton() / "tritonserver"
        # The backend folder and the log; a fresh temporary folder unless given.
        self._work = Path(work) if work else Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self.log = self._work / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _backends(self) -> Path:
        """The backend folder as the server wants it: the Python backend with the stub built
        for this interpreter's Python version beside it."""
        python = self._work / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        shipped = self._root / "backends" / "python"
        for item in shipped.iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        stub = (
            self._root / "python_backend_stubs" / _python_version() / "triton_python_backend_stub"
        )
        (python / stub.name).symlink_to(stub)
        return python.parent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        libs = [_libpython_dir(), self._root.parent.parent / "nvidia_pytriton.libs"]
        extra = env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(p) for p in libs if p] + [extra]).strip(":")
        return env

    def start(self) -> TritonServer:
        backends = self._backends()
        # A port taken between choosing it and the server binding it: choose again, twice.
        for _attempt in range(3):
            port = _free_port()
            self._launch(backends, port)
            if self._wait_ready(port):
                self.url = f"127.0.0.1:{port}"
                return self
            if "Address already in use" not in self.log_text():
                break
        self.stop()
        raise RuntimeError(f"tritonserver did not start; its log ends:\n{self.log_text()[-4000:]}")

    def _launch(self, backends: Path, port: int) -> None:
        argv = [
            str(self._root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={port}",
            "--pinned-memory-pool-byte-size=0",  # no CUDA here: no pinned memory to ask for
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._work,
                preexec_fn=_end_with_parent,
            )

    def _wait_ready(self, port: int) -> bool:
        """True once the server and its models are ready; False when it exited."""
        import tritonclient.grpc as grpc

        client = grpc.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.is_server_ready():
                        return True
                except Exception:  # InferenceServerException: not listening yet
                    pass
                time.sleep(0.5)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(
            f"tritonserver not ready after {self.startup_timeout:g} s; its log ends:\n"
            f"{self.log_text()[-4000:]}"
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None
