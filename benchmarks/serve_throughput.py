"""Reception throughput of ``brainmets serve`` beside Orthanc, and its result latency.

Throughput: the same ``storescu`` stream (one association, every instance of ``--studies``
generated head CT studies) goes to serve and to Orthanc in turn, ``--rounds`` times, each round
with studies neither has seen (a duplicate costs a receiver less). Serve acknowledges an
instance only after it is fsync'd into its spool and recorded in SQLite; the stability window is
set long here so that no scoring runs during reception. The ratio is taken round by round.

Latency: a second serve process (``--stable-seconds``) forwards to the same Orthanc; for each of
``--latency-studies`` studies, the time from storescu's last acknowledged instance to the moment
Orthanc holds all of the study's results (SR and secondary captures), minus the stability
window: what the node adds (scoring, Grad-CAM, writing, C-STORE).

    PYTHONPATH=src python benchmarks/serve_throughput.py --json benchmarks/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
from brainmets.model.checkpoint import save_checkpoint
from brainmets.model.resnet import BrainMetsNet
from brainmets.rundir import environment_info


def peer(tool: str) -> str | None:
    """dcmtk's or Orthanc's program, not pynetdicom's same-named app in this environment's bin."""
    ours = (Path(sys.prefix) / "bin").resolve()
    dirs = [
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != ours
    ]
    return shutil.which(tool, path=os.pathsep.join(dirs))


ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} after {timeout:g}s")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


class Orthanc:
    def __init__(self, root: Path):
        self.http, self.dicom = _free_port(), _free_port()
        root.mkdir(parents=True)
        config = {
            "Name": "bench", "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "SaveJobs": False,
            "Plugins": [],
        }  # fmt: skip
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [peer("Orthanc"), str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        _wait(lambda: _listening(self.dicom) and _listening(self.http), 60, "Orthanc up")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def results_of(self, study_uid: str) -> int:
        """Instances of brainmets' result series (SR, secondary captures) in the study."""
        count = 0
        for study in self.get_find(study_uid):
            for series in self.get(f"/studies/{study}/series"):
                if series["MainDicomTags"].get("Modality") in ("SR", "OT"):
                    count += len(series["Instances"])
        return count

    def get_find(self, study_uid: str) -> list[str]:
        body = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/tools/find", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


class Serve:
    def __init__(self, run: Path, store: Path, stable: float, forward: str | None, device: str):
        self.port = _free_port()
        # --allow-chance: a seeded model records no ranking verdict, which serve refuses.
        args = [sys.executable, "-m", "brainmets", "serve", str(run), "--store", str(store),
                "--port", str(self.port), "--stable-seconds", str(stable), "--device", device,
                "--allow-chance"]  # fmt: skip
        if forward:
            args += ["--forward", forward]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.log = open(store.parent / f"{store.name}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        _wait(lambda: _listening(self.port), 300, "serve listening")

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def storescu(port: int, aec: str, folders: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [peer("storescu"), "-aec", aec, "+sd", "+r", "127.0.0.1", str(port), *map(str, folders)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def _study_uid(folder: Path) -> str:
    import pydicom

    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID


def _instances(folders: list[Path]) -> int:
    return sum(1 for f in folders for p in f.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4, help="studies per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, nargs=2, default=(24, 32))
    parser.add_argument("--latency-studies", type=int, default=3)
    parser.add_argument("--stable-seconds", type=float, default=5.0)
    parser.add_argument("--arch", default="resnet50", help="architecture of the seeded model")
    parser.add_argument("--size", type=int, default=256, help="the model's input size")
    parser.add_argument("--run", type=Path, help="a trained run instead of a seeded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for tool in ("storescu", "Orthanc"):
        if peer(tool) is None:
            parser.error(f"{tool} not found: apt-get install dcmtk orthanc")

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    total = args.studies * args.rounds + args.latency_studies
    cfg = SynthConfig(num_patients=total, matrix=args.matrix, slices=tuple(args.slices), seed=11)
    write_synthetic_cohort(work / "cohort", cfg, progress=False, workers=os.cpu_count() or 1)
    studies = sorted((work / "cohort" / "dicom").iterdir())
    run = args.run
    if run is None:
        run = work / "run"
        torch.manual_seed(0)
        preprocess = {"min_slices": 8, "size": args.size, "slice_mm": 5.0,
                      "window_center": 40.0, "window_width": 80.0}  # fmt: skip
        save_checkpoint(
            BrainMetsNet(args.arch).eval(),
            run / "model.safetensors",
            {"preprocess": preprocess, "normalization": "zscore", "threshold": 0.5},
        )

    orthanc = Orthanc(work / "orthanc")
    serve = Serve(run, work / "store", 3600.0, None, args.device)
    rounds = []
    try:
        for r in range(args.rounds):
            batch = studies[r * args.studies : (r + 1) * args.studies]
            n = _instances(batch)
            # Alternate who goes first, so that neither always meets a warmer page cache.
            order = [("serve", serve.port, "BRAINMETS"), ("orthanc", orthanc.dicom, "ORTHANC")]
            if r % 2:
                order.reverse()
            seconds = {name: storescu(port, aec, batch) for name, port, aec in order}
            rounds.append({
                "instances": n,
                "serve_per_s": n / seconds["serve"],
                "orthanc_per_s": n / seconds["orthanc"],
                "ratio": seconds["orthanc"] / seconds["serve"],
            })  # fmt: skip
            print(f"round {r + 1}: {n} instances, serve {n / seconds['serve']:.0f}/s, "
                  f"orthanc {n / seconds['orthanc']:.0f}/s", flush=True)  # fmt: skip
    finally:
        serve.stop()

    latencies = []
    forwarding = Serve(
        run, work / "store-latency", args.stable_seconds, f"ORTHANC@127.0.0.1:{orthanc.dicom}",
        args.device,
    )  # fmt: skip
    try:
        for study in studies[args.studies * args.rounds :]:
            uid = _study_uid(study)
            storescu(forwarding.port, "BRAINMETS", [study])
            last = time.perf_counter()
            # The SR and the secondary captures (3 by default) of the study, in Orthanc.
            _wait(lambda uid=uid: orthanc.results_of(uid) >= 4, 600, "results in Orthanc")
            latency = time.perf_counter() - last - args.stable_seconds
            latencies.append(latency)
            print(
                f"latency {latency:.2f} s beyond the {args.stable_seconds:g} s window", flush=True
            )
    finally:
        forwarding.stop()
        orthanc.stop()

    report = {
        "command": "python benchmarks/serve_throughput.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "environment": environment_info(torch.device("cpu"), 1),
        "matrix": args.matrix,
        "model": str(args.run) if args.run else f"seeded {args.arch} at {args.size} px",
        "rounds": rounds,
        "serve_per_s": statistics.median(r["serve_per_s"] for r in rounds),
        "orthanc_per_s": statistics.median(r["orthanc_per_s"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "ratio_min": min(r["ratio"] for r in rounds),
        "ratio_max": max(r["ratio"] for r in rounds),
        "stable_seconds": args.stable_seconds,
        "latency_s": latencies,
        "latency_median_s": statistics.median(latencies) if latencies else None,
    }
    print(
        f"reception: serve {report['serve_per_s']:.0f} instances/s, Orthanc "
        f"{report['orthanc_per_s']:.0f}/s, ratio {report['ratio']:.2f} "
        f"({report['ratio_min']:.2f}-{report['ratio_max']:.2f}); latency beyond the window "
        f"{report['latency_median_s']:.2f} s (median of {len(latencies)})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
