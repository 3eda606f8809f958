"""Grad-CAM of a patient's top slices: the files, their index, and a patient predicted again."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from brainmets import rundir
from brainmets.heatmaps import update_heatmap_index, write_heatmaps
from brainmets.inference import load_trained


def _patient(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(6, 48, 48), dtype=np.uint8)
    return array, rng.normal(size=6).astype(np.float32)


def test_the_top_k_slices_are_drawn_in_rank_order(tiny_run, tmp_path):
    trained = load_trained(tiny_run, "cpu")
    array, logits = _patient(0)
    rows = write_heatmaps(trained, "P/1", array, logits, tmp_path, top_k=2)
    assert [r["rank"] for r in rows] == [1, 2]
    assert [r["slice_index"] for r in rows] == np.argsort(logits)[::-1][:2].tolist()
    assert rows[0]["slice_logit"] == float(logits.max())
    for row in rows:  # a patient id with a slash still makes one file in the folder
        path = tmp_path / row["file"]
        assert path.parent == tmp_path and Image.open(path).size[0] > 100


def test_a_patient_predicted_again_replaces_its_heatmaps(tiny_run, tmp_path):
    trained = load_trained(tiny_run, "cpu")
    first = write_heatmaps(trained, "A", *_patient(1), tmp_path, top_k=3)
    other = write_heatmaps(trained, "B", *_patient(2), tmp_path, top_k=1)
    update_heatmap_index(tmp_path, [*first, *other])
    again = write_heatmaps(trained, "A", *_patient(3), tmp_path, top_k=1)
    update_heatmap_index(tmp_path, again)
    index = pd.read_csv(tmp_path / rundir.HEATMAP_INDEX, dtype={"patient_id": str})
    assert index["patient_id"].tolist() == ["A", "B"]
    assert set(index["file"]) == {again[0]["file"], other[0]["file"]}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(index["file"])
