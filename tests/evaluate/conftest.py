"""A generated cohort with known lesions, prepared for two small seeded runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

SIZE = 48


@dataclass
class KnownLesions:
    root: Path
    cache: Path
    index: Path
    lesions: Path
    rendered: dict  # patient_id -> SyntheticPatient
    run: Path  # calls every patient positive (threshold 0): every positive is a true positive
    other_run: Path  # another seed, threshold 0.5


def _run(folder: Path, seed: int, threshold: float) -> Path:
    import torch

    from brainmets.model.checkpoint import save_checkpoint
    from brainmets.model.resnet import BrainMetsNet

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    sidecar = {
        "preprocess": {"min_slices": 8, "size": SIZE, "slice_mm": 5.0, "window_center": 40.0,
                       "window_width": 80.0},
        "normalization": "zscore",
        "threshold": threshold,
        "epoch": 0,
    }  # fmt: skip
    save_checkpoint(BrainMetsNet("resnet18").eval(), folder / "model.safetensors", sidecar)
    return folder


@pytest.fixture(scope="session")
def known_lesions(tmp_path_factory) -> KnownLesions:
    """Ten patients (five with 1-4 metastases of 18-30 mm), 64-pixel slices, cached at 48."""
    from brainmets.config import PreprocessConfig
    from brainmets.data.labels import read_labels
    from brainmets.data.prepare import prepare_cache
    from brainmets.data.series_index import choose_for, index_dicom_root, write_index
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    root = tmp_path_factory.mktemp("known_lesions")
    config = SynthConfig(num_patients=10, positive_fraction=0.5, matrix=64, slices=(10, 12),
                         lesion_diameter_mm=(8.0, 30.0), seed=3)  # fmt: skip
    rendered: dict = {}
    labels = write_synthetic_cohort(root / "cohort", config, progress=False,
                                    on_patient=lambda pid, p: rendered.setdefault(pid, p))  # fmt: skip
    preprocess = PreprocessConfig(size=SIZE, min_slices=8)
    index = index_dicom_root(root / "cohort" / "dicom", workers=1, progress=False)
    index.series = choose_for(index.series, preprocess)
    write_index(index, root / "index")
    prepare_cache(read_labels(labels), root / "cache", preprocess, series_index=index,
                  workers=1, progress=False)  # fmt: skip
    return KnownLesions(
        root=root,
        cache=root / "cache",
        index=root / "index",
        lesions=root / "cohort" / "lesions.csv",
        rendered=rendered,
        run=_run(root / "run", 0, 0.0),
        other_run=_run(root / "other_run", 1, 0.5),
    )
