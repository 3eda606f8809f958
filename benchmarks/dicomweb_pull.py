"""Reception by pull (``serve --pull``) against reception by C-STORE, beside Orthanc.

Each round, two generated head CT studies neither path has seen: one is put into Orthanc (its
REST API) and pulled by the node's puller (QIDO-RS listing, WADO-RS of the series, the receipt
checks, fsync into the spool, the record); the other is sent by dcmtk's storescu to the node's
Storage SCP (the same checks, fsync and record). Who goes first alternates. Also measured: how
long Orthanc's DICOMweb plugin takes to send the instances of one series one request at a time
against one request for the series (why the puller fetches a series whole).

    PYTHONPATH=src python benchmarks/dicomweb_pull.py --json benchmarks/results/dicomweb_pull_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
from brainmets.dicomweb import client
from brainmets.rundir import environment_info
from brainmets.serve.admission import Limits
from brainmets.serve.pull import ANY_SYNTAX, Puller, PullSource
from brainmets.serve.record import Record
from brainmets.serve.scp import StorageSCP
from brainmets.serve.spool import Spool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve.conftest import Orthanc, dcmtk, dicomweb_plugin  # noqa: E402 - the tests' peers


def _files(study: Path) -> list[Path]:
    return sorted(p for p in study.rglob("*") if p.is_file())


def _pull(orthanc: Orthanc, study: Path, store: Path) -> tuple[int, float]:
    orthanc.upload(*_files(study))
    record = Record(store)
    puller = Puller(PullSource(orthanc.dicomweb, since="19000101"), Spool(store), record)
    start = time.perf_counter()
    kept = puller.poll()
    seconds = time.perf_counter() - start
    record.close()
    return kept, seconds


def _c_store(study: Path, store: Path) -> tuple[int, float]:
    record = Record(store)
    scp = StorageSCP(Spool(store), record, ae_title="BRAINMETS", limits=Limits(min_free_bytes=0))
    port = scp.start("127.0.0.1", 0)
    start = time.perf_counter()
    subprocess.run(
        [dcmtk("storescu"), "-aec", "BRAINMETS", "+sd", "+r", "127.0.0.1", str(port), str(study)],
        check=True, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    scp.stop()
    record.close()
    return len(_files(study)), seconds


def _wado_one_by_one_vs_series(orthanc: Orthanc, study: Path) -> dict:
    """Seconds per instance, one WADO-RS request each against one for the series."""
    orthanc.upload(*_files(study))
    session = client(orthanc.dicomweb)
    items = session.search_for_instances()
    uid = lambda item, tag: item[tag]["Value"][0]  # noqa: E731
    series = max({uid(i, "0020000E") for i in items},
                 key=lambda s: sum(uid(i, "0020000E") == s for i in items))  # fmt: skip
    mine = [i for i in items if uid(i, "0020000E") == series]
    start = time.perf_counter()
    for item in mine:
        session.retrieve_instance(uid(item, "0020000D"), series, uid(item, "00080018"),
                                  media_types=ANY_SYNTAX)  # fmt: skip
    one = (time.perf_counter() - start) / len(mine)
    start = time.perf_counter()
    count = sum(1 for _ in session.iter_series(uid(mine[0], "0020000D"), series,
                                               media_types=ANY_SYNTAX))  # fmt: skip
    whole = (time.perf_counter() - start) / count
    return {"instances": len(mine), "one_by_one_s": one, "series_s": whole}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, nargs=2, default=(40, 40))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if dcmtk("storescu") is None or dcmtk("Orthanc") is None or dicomweb_plugin() is None:
        parser.error("needs dcmtk, Orthanc and its DICOMweb plugin (apt-get install dcmtk "
                     "orthanc orthanc-dicomweb)")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    cfg = SynthConfig(num_patients=2 * args.rounds + 1, matrix=args.matrix,
                      slices=tuple(args.slices), seed=3)  # fmt: skip
    write_synthetic_cohort(work / "cohort", cfg, progress=False, workers=os.cpu_count() or 1)
    studies = sorted((work / "cohort" / "dicom").iterdir())
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    rounds = []
    try:
        version = orthanc.get("/system")["Version"]
        wado = _wado_one_by_one_vs_series(orthanc, studies[-1])
        for r in range(args.rounds):
            orthanc.clear()
            pulled, stored = studies[2 * r], studies[2 * r + 1]
            ways = [("pull", lambda p=pulled, r=r: _pull(orthanc, p, work / f"pull{r}")),
                    ("c_store", lambda s=stored, r=r: _c_store(s, work / f"store{r}"))]  # fmt: skip
            result = {}
            for name, way in ways if r % 2 == 0 else ways[::-1]:
                count, seconds = way()
                result[name] = count / seconds
            result["ratio"] = result["c_store"] / result["pull"]
            rounds.append(result)
            print(f"round {r}: pull {result['pull']:.1f}/s, C-STORE {result['c_store']:.1f}/s",
                  flush=True)  # fmt: skip
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        "date": dt.date.today().isoformat(),
        "matrix": args.matrix,
        "slices": list(args.slices),
        "rounds": rounds,
        "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "wado": wado,
        "orthanc": version,
        "environment": environment_info("cpu", 1),
    }
    print(json.dumps(summary["median"]), json.dumps(wado))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
