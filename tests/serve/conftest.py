"""Fixtures of the serve tests: a small trained-looking run, generated head CT studies, and the
real peers: dcmtk (storescu, echoscu, dsrdump) as the scanner and Orthanc as PACS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PEERS = ("storescu", "echoscu", "dsrdump", "Orthanc")
SERVE_AE = "BRAINMETS"
ORTHANC_AE = "ORTHANC"


def dcmtk(tool: str) -> str | None:
    """The path of a peer program that is not from this Python environment: pynetdicom installs
    Python apps named storescu and echoscu, with other options, into the environment's bin,
    which an activated venv puts first on PATH."""
    ours = (Path(sys.prefix) / "bin").resolve()
    for folder in filter(None, os.environ.get("PATH", "").split(os.pathsep)):
        if Path(folder).resolve() != ours and (found := shutil.which(tool, path=folder)):
            return found
    return None


def _missing(tools) -> list[str]:
    return [tool for tool in tools if dcmtk(tool) is None]


@pytest.fixture(scope="session")
def peers() -> None:
    """dcmtk and Orthanc on PATH: skipped locally without them, a failure under CI."""
    missing = _missing(PEERS)
    if missing:
        message = (
            f"{', '.join(missing)} not installed (apt-get install dcmtk orthanc): "
            "serve tests with real DICOM peers skipped"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def ct_series_files(study: Path) -> list[Path]:
    """The axial CT files of a generated study (its largest series)."""
    import pydicom

    by_series: dict[str, list[Path]] = {}
    for path in sorted(p for p in study.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(path)
    return max(by_series.values(), key=len)


# ------------------------------------------------------------------------------- runs


def _run_with_verdict(tiny_run: Path, out: Path, verdict: str) -> Path:
    """``tiny_run``'s weights with the ranking verdict train records in model.json."""
    from brainmets.ranking import RankingVerdict

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_run / "model.safetensors", out / "model.safetensors")
    sidecar = json.loads((tiny_run / "model.json").read_text())
    if verdict == "ranks":
        ranking = RankingVerdict(verdict, auc=0.91, auc_ci=(0.84, 0.97), separation=0.31,
                                 separation_band="good", n_pos=40, n_neg=60)  # fmt: skip
    else:
        ranking = RankingVerdict(verdict, auc=0.52, auc_ci=(0.38, 0.66), separation=0.01,
                                 separation_band="poor", n_pos=40, n_neg=60,
                                 reasons=["the AUC's 95% interval contains 0.5"])  # fmt: skip
    sidecar["ranking"] = ranking.to_json()
    (out / "model.json").write_text(json.dumps(sidecar))
    return out


@pytest.fixture(scope="session")
def serve_run(tiny_run, tmp_path_factory) -> Path:
    """A run whose model ranks its validation patients: what serve accepts by default."""
    return _run_with_verdict(tiny_run, tmp_path_factory.mktemp("serve-run"), "ranks")


@pytest.fixture(scope="session")
def chance_run(tiny_run, tmp_path_factory) -> Path:
    """A run that ended "not shown to rank better than chance" (train's exit 3)."""
    return _run_with_verdict(tiny_run, tmp_path_factory.mktemp("chance-run"), "does_not_rank")


def copy_study(files, out: Path, edit=None) -> Path:
    """Copies of ``files`` in ``out``, each edited by ``edit(ds, i)`` when given."""
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(ds, i)
        ds.save_as(out / f"{i:03d}.dcm", enforce_file_format=False)
    return out


# ------------------------------------------------------------------------------- Orthanc


class Orthanc:
    """Orthanc on loopback ports with its own storage: the PACS results are forwarded to."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.process: subprocess.Popen | None = None
        # Where the "brainmets" modality listens, and Lua scripts: set before start().
        self.serve_port = 104
        self.lua_scripts: list[Path] = []
        self.config = root / "orthanc.json"

    def _write_config(self) -> None:
        config = {
            "Name": "brainmets-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "SaveJobs": False,
            "Plugins": [],
            "DicomModalities": {"brainmets": [SERVE_AE, "127.0.0.1", self.serve_port]},
            "LuaScripts": [str(path) for path in self.lua_scripts],
        }
        self.config.write_text(json.dumps(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        return f"{ORTHANC_AE}@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        self._write_config()
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [dcmtk("Orthanc"), str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, 30, "Orthanc to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
        return (
            json.loads(body) if response.headers.get_content_type() == "application/json" else body
        )

    def instances(self) -> list[dict]:
        """Every stored instance with its main tags."""
        return [
            {"id": i, **self.get(f"/instances/{i}/simplified-tags")} for i in self.get("/instances")
        ]

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def clear(self) -> None:
        for patient in self.get("/patients"):
            request = urllib.request.Request(self.url + f"/patients/{patient}", method="DELETE")
            urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="module")
def orthanc(peers, tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


# ------------------------------------------------------------------------------- serve


class ServeProcess:
    """``brainmets serve`` as its own process (it may be killed with SIGKILL)."""

    def __init__(self, run: Path, store: Path, *args: str, stable: float = 1.0):
        self.run, self.store = run, store
        self.port = free_port()
        self.args = [
            "--port", str(self.port), "--ae-title", SERVE_AE, "--stable-seconds", str(stable),
            "--device", "cpu", "--top-k", "2", *args,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.log = store.parent / f"{store.name}-serve.log"

    def start(self) -> ServeProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        src = str(Path(__file__).resolve().parents[2] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "brainmets", "serve", str(self.run), "--store",
                 str(self.store), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        wait_for(self._listening, 90, "serve to listen")
        return self

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited ({self.process.returncode}): {self.log_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or an OOM kill would leave it."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


def storescu(port: int, *paths: Path, aet: str = "STORESCU", check: bool = True, options=()):
    """dcmtk's storescu: every file under ``paths`` in one association."""
    result = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", aet, "-aec", SERVE_AE, "+sd", "+r", "-nh", *options,
         "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}): {result.stderr}")
    return result


def status_rows(store: Path):
    from brainmets.serve.record import read_status

    return read_status(store)
