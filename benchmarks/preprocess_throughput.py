"""Per-core cost of each preprocessing step from 512² DICOM, beside a plain-PyTorch resize.

Where ``pipeline_throughput.py`` measures ``prepare`` and ``predict`` on all cores, this splits
one core's work per slice: decoding to HU (pydicom's read and decode plus the rescale, the
floor every DICOM path pays), slab averaging, the brain window, the resize to ``--size`` and the
uint8 storage. The reference is the resize as plain PyTorch does it
(``F.interpolate(..., mode="bilinear", antialias=True)``, one thread), on the same slices in
the same run; the outputs are checked equal. Best of ``--repeats`` passes per step.

The process is set up as one of prepare's workers (``init_worker``: one thread, freed memory
kept for the next patient); ``--glibc-defaults`` leaves malloc as it is, to measure what
that setting saves.

    PYTHONPATH=src python benchmarks/preprocess_throughput.py --patients 16 --json pre.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from brainmets.data.dicom import load_series
from brainmets.data.series_index import index_dicom_root, series_files
from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
from brainmets.data.volume import brain_window, resize_slices, slab_resample, to_uint8
from brainmets.data.workers import init_worker


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_resize(x: np.ndarray, size: int) -> np.ndarray:
    """The plain-PyTorch reference (square input)."""
    out = F.interpolate(
        torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", antialias=True
    )
    return out[:, 0].numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--thickness", type=float, default=1.0,
                        help="generated slice thickness (mm); 1 mm makes slab averaging work")  # fmt: skip
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="do not keep freed memory (as before init_worker did)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.glibc_defaults:
        torch.set_num_threads(1)  # one core, as each of prepare's workers
        cv2.setNumThreads(1)
        kept = False
    else:
        kept = init_worker()

    with tempfile.TemporaryDirectory() as tmp:
        synth = SynthConfig(
            num_patients=args.patients,
            matrix=512,
            slices=(50, 60),
            slice_thickness_mm=args.thickness,
        )
        write_synthetic_cohort(Path(tmp), synth, progress=False, workers=1)
        index = index_dicom_root(Path(tmp) / "dicom", progress=False)
        chosen = index.series[index.series["chosen"]]
        series = [series_files(index, uid) for uid in chosen["series_uid"]]
        volumes = [load_series(files) for files in series]
        slices = sum(v.hu.shape[0] for v in volumes)
        seconds = {"decode to HU": _best(lambda: [load_series(f) for f in series], args.repeats)}

        slabs = [slab_resample(v.hu, v.positions_mm, 5.0)[0] for v in volumes]
        seconds["5 mm slabs"] = _best(
            lambda: [slab_resample(v.hu, v.positions_mm, 5.0) for v in volumes], args.repeats
        )
        windowed = [brain_window(s) for s in slabs]
        seconds["brain window"] = _best(lambda: [brain_window(s) for s in slabs], args.repeats)
        seconds["resize"] = _best(
            lambda: [resize_slices(w, args.size) for w in windowed], args.repeats
        )
        seconds["resize, plain PyTorch"] = _best(
            lambda: [torch_resize(w, args.size) for w in windowed], args.repeats
        )
        resized = [resize_slices(w, args.size) for w in windowed]
        difference = max(
            float(np.abs(r - torch_resize(w, args.size)).max())
            for r, w in zip(resized, windowed, strict=True)
        )
        seconds["uint8"] = _best(lambda: [to_uint8(r) for r in resized], args.repeats)

    slab_slices = sum(s.shape[0] for s in slabs)
    # Per input slice for decoding and slabs; per slab for what runs on slabs.
    per = {
        name: 1e3 * t / (slices if name in ("decode to HU", "5 mm slabs") else slab_slices)
        for name, t in seconds.items()
    }
    memory = "freed memory kept" if kept else "glibc malloc defaults"
    print(
        f"one core, {slices} slices of 512² ({args.thickness:g} mm) -> {slab_slices} slabs, "
        f"{memory}"
    )
    print(f"{'step':<24} {'ms/slice':>9} {'slices/s':>9}")
    for name, ms in per.items():
        print(f"{name:<24} {ms:>9.3f} {1e3 / ms:>9.0f}")
    speedup = seconds["resize, plain PyTorch"] / seconds["resize"]
    print(f"resize vs plain PyTorch: {speedup:.2f}x, largest difference {difference:.2e}")
    report = {
        "slices": slices,
        "slabs": slab_slices,
        "ms_per_slice": per,
        "resize_vs_torch": speedup,
        "resize_max_abs_difference": difference,
        "freed_memory_kept": kept,
        "torch": torch.__version__,
        "opencv": cv2.__version__,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
