"""``evaluate --lesions``: the localisation measures on a generated cohort whose lesions are
known, recomputed here by hand from the generator's own geometry, and the subgroups."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

from brainmets.cli import main
from brainmets.data.cache import PatientCache
from brainmets.heatmaps import grad_cam
from brainmets.inference import load_trained

MARGIN_MM = 15.0
SLAB_MM = 5.0


@pytest.fixture(scope="module")
def evaluated(known_lesions, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("evaluated")
    rc = main(["-q", "evaluate", str(known_lesions.run), "--data", str(known_lesions.cache),
               "--lesions", str(known_lesions.lesions), "--out", str(out), "--n-boot", "20"])  # fmt: skip
    assert rc == 0
    return out, json.loads((out / "metrics.json").read_text())


def _peak(cam: np.ndarray) -> tuple[float, float]:
    """The centre of the pixels within 1 % of the maximum that touch the first maximum."""
    from scipy import ndimage

    regions, _ = ndimage.label(cam >= 0.99 * cam.max(), structure=np.ones((3, 3)))
    rows, columns = np.nonzero(regions == regions[np.unravel_index(np.argmax(cam), cam.shape)])
    return rows.mean(), columns.mean()


@pytest.fixture(scope="module")
def by_hand(known_lesions):
    """Per positive patient: top slice, hit, Grad-CAM pointing, and per lesion whether a slab
    through it is among the top 3, from the truth CSV, the cache's slab positions and the
    generator's pixel grid (origin and spacing), not from brainmets.data.lesions."""
    trained = load_trained(known_lesions.run, "cpu")
    cache = PatientCache(known_lesions.cache)
    truth = pd.read_csv(known_lesions.lesions, dtype={"patient_id": str})
    patients, lesions = {}, []
    for pid, rows in truth.groupby("patient_id"):
        patient = known_lesions.rendered[pid]
        array = cache.load(pid)
        logits = trained.scorer([np.asarray(array)]).slice_logits.numpy()
        top = int(np.argmax(logits))
        positions = np.load(known_lesions.cache / "patients" / f"{pid}.pos.npy")
        slabs = [set(np.flatnonzero(np.abs(positions - r.z_mm) < r.diameter_mm / 2 + SLAB_MM / 2))
                 for r in rows.itertuples()]  # fmt: skip
        near = [min(abs(top - k) for k in s) <= 1 for s in slabs]
        image = torch.from_numpy(np.array(array[top : top + 1]))
        cam = grad_cam(trained.model, trained.scorer.network_inputs(image))[0]
        peak = _peak(cam)
        spacing = patient.pixel_spacing_mm[0]
        scale = array.shape[1] / patient.hu.shape[1]
        pointing = False
        for r, close in zip(rows.itertuples(), near, strict=True):
            row = ((r.y_mm - patient.origin_mm[1]) / spacing + 0.5) * scale - 0.5
            column = ((r.x_mm - patient.origin_mm[0]) / spacing + 0.5) * scale - 0.5
            distance = math.hypot(peak[0] - row, peak[1] - column) * spacing / scale
            pointing |= close and distance <= r.diameter_mm / 2 + MARGIN_MM
        patients[pid] = {"top": top, "hit": any(near), "pointing": pointing}
        best3 = set(np.argsort(-logits, kind="stable")[:3].tolist())
        lesions += [
            (r.diameter_mm, bool(best3 & s)) for r, s in zip(rows.itertuples(), slabs, strict=True)
        ]
    return patients, lesions


def test_hit_rate_and_pointing_game_are_what_a_hand_count_gives(evaluated, by_hand):
    out, metrics = evaluated
    loc = metrics["localisation"]
    by_hand, _ = by_hand
    table = pd.read_csv(out / "localisation_patients.csv", dtype={"patient_id": str})
    assert sorted(table["patient_id"]) == sorted(by_hand) and len(by_hand) == 5
    for row in table.itertuples():
        expected = by_hand[row.patient_id]
        assert row.true_positive  # the run calls everyone positive
        assert (row.top_slice, bool(row.hit), bool(row.pointing)) == (
            expected["top"],
            expected["hit"],
            expected["pointing"],
        ), row.patient_id
    hits = sum(p["hit"] for p in by_hand.values())
    pointing = sum(p["pointing"] for p in by_hand.values())
    assert loc["top_slice_hit_rate"]["value"] == pytest.approx(hits / 5)
    assert loc["pointing_game"]["value"] == pytest.approx(pointing / 5)
    wilson = binomtest(hits, 5).proportion_ci(0.95, method="wilson")
    assert loc["top_slice_hit_rate"]["ci"] == pytest.approx([wilson.low, wilson.high])
    assert loc["top_slice_hit_rate"]["ci_method"] == "wilson"
    assert loc["margin_mm"] == MARGIN_MM and loc["true_positive_patients"] == 5


def test_the_chance_level_is_the_share_of_slices_that_would_hit(known_lesions, evaluated):
    out, metrics = evaluated
    cache = PatientCache(known_lesions.cache)
    truth = pd.read_csv(known_lesions.lesions, dtype={"patient_id": str})
    shares = []
    for pid, rows in truth.groupby("patient_id"):
        positions = cache.positions(pid)
        slabs = set()
        for r in rows.itertuples():
            slabs |= set(
                np.flatnonzero(np.abs(positions - r.z_mm) < r.diameter_mm / 2 + SLAB_MM / 2)
            )
        near = [k for k in range(len(positions)) if min(abs(k - s) for s in slabs) <= 1]
        shares.append(len(near) / len(positions))
    assert metrics["localisation"]["top_slice_hit_rate"]["chance"] == pytest.approx(np.mean(shares))


def test_lesion_detection_by_diameter_is_a_hand_count(evaluated, by_hand):
    _, metrics = evaluated
    detection = metrics["localisation"]["lesion_detection"]
    _, lesions = by_hand
    assert detection["n"] == len(lesions)
    assert detection["successes"] == sum(found for _, found in lesions)
    bands = {
        "<10 mm": lambda d: d < 10,
        "10-20 mm": lambda d: 10 <= d <= 20,
        ">20 mm": lambda d: d > 20,
    }
    for band, inside in bands.items():
        chosen = [found for d, found in lesions if inside(d)]
        entry = detection["by_diameter"][band]
        assert (entry["n"], entry["successes"]) == (len(chosen), sum(chosen)), band
        if not chosen:
            assert entry["value"] is None and entry["ci"] == [None, None]


def test_the_summary_the_figure_and_the_report_show_localisation(known_lesions, tmp_path, capsys):
    """Into the run's own evaluation (so the report shows it), with one lesion moved out of the
    scanned range: it is reported, not fatal."""
    run = tmp_path / "run"
    shutil.copytree(known_lesions.run, run)
    truth = pd.read_csv(known_lesions.lesions, dtype={"patient_id": str})
    truth.loc[0, "z_mm"] += 1000.0
    lesions = tmp_path / "lesions.csv"
    truth.to_csv(lesions, index=False)
    assert main(["-q", "evaluate", str(run), "--data", str(known_lesions.cache), "--lesions",
                 str(lesions), "--n-boot", "0"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "top-slice hit rate" in text and "pointing game" in text and "lesion detection" in text
    assert "chance" in text and "Wilson" in text and "1 lesions that could not be placed" in text
    assert (run / "evaluation" / "localisation.png").stat().st_size > 10_000
    loc = json.loads((run / "evaluation" / "metrics.json").read_text())["localisation"]
    assert loc["lesions_placed"] == len(truth) - 1
    (missing,) = loc["lesions_not_placed"]
    assert missing["line"] == 2 and "outside the scanned range" in missing["reason"]
    page = (run / "report.html").read_text()
    assert '<section id="localisation">' in page and "Top-slice hit rate" in page
    assert '<section id="subgroups">' in page and "too few" in page
    # The figure sits in its own section, not among the evaluation plots.
    plots = page.split('<section id="plots">')[1].split("</section>")[0]
    assert "Top slice of true-positive patients" not in plots


def test_a_subgroup_too_small_for_a_ci_says_so(evaluated, capsys):
    _, metrics = evaluated
    groups = {(g["by"], g["group"]): g for g in metrics["subgroups"]["groups"]}
    whole = groups[("manufacturer", "brainmets-synth")]
    assert (whole["n_pos"], whole["n_neg"]) == (5, 5)
    assert whole["auc"]["value"] is not None and whole["sensitivity"]["ci"] is not None
    kernels = [g for (by, _), g in groups.items() if by == "kernel"]
    assert len(kernels) > 1 and all(g["n"] < 10 for g in kernels)
    for group in kernels:
        for name in ("auc", "sensitivity", "specificity"):
            assert group[name]["value"] is None and group[name]["note"].startswith("too few")
    size_bands = [g for (by, _), g in groups.items() if by == "lesion_size"]
    assert len(size_bands) == 3
    assert all(g["specificity"]["note"] == "all negatives (no lesion size)" for g in size_bands)


def test_subgroup_fields_from_the_index_match_the_headers(known_lesions):
    from brainmets.data.series_index import read_index
    from brainmets.evaluate.subgroups import series_fields

    cache = PatientCache(known_lesions.cache)
    ids = cache.patient_ids
    from_headers = series_fields(cache, ids)
    from_index = series_fields(cache, ids, read_index(known_lesions.index))
    pd.testing.assert_frame_equal(from_headers, from_index)
    assert set(from_headers["manufacturer"]) == {"brainmets-synth"}
    assert (from_headers["slice_thickness_mm"] == 5.0).all()


def test_a_bad_lesion_file_stops_evaluate_before_it_scores(known_lesions, tmp_path, capsys):
    bad = tmp_path / "lesions.csv"
    bad.write_text("patient_id,x_mm,y_mm,z_mm,diameter_mm\nSYN0001,1,2,3,4\nSYN0002,1,2,,4\n")
    rc = main(["-q", "evaluate", str(known_lesions.run), "--data", str(known_lesions.cache),
               "--lesions", str(bad), "--out", str(tmp_path / "ev")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "line 3 (patient SYN0002): z_mm empty" in err
    assert not (tmp_path / "ev").exists()


@pytest.fixture(scope="module")
def chosen_top_slices(known_lesions):
    """Top slices chosen here: on a lesion for every other patient, far from it for the rest,
    so that hits and misses both occur; each top slice's heatmap peak."""
    from brainmets.data.lesions import place_lesions, read_lesion_truth

    trained = load_trained(known_lesions.run, "cpu")
    cache = PatientCache(known_lesions.cache)
    truth = pd.read_csv(known_lesions.lesions, dtype={"patient_id": str})
    placed = place_lesions(read_lesion_truth(known_lesions.lesions), cache, cache.patient_ids)
    rows, peaks = [], {}
    for i, (pid, lesions) in enumerate(truth.groupby("patient_id")):
        distance = np.abs(cache.positions(pid) - lesions.iloc[0].z_mm)
        top = int(np.argmin(distance)) if i % 2 == 0 else int(np.argmax(distance))
        rows.append({"patient_id": pid, "label": 1, "probability": 0.9, "decision": 1,
                     "top_slice_index": top})  # fmt: skip
        image = torch.from_numpy(np.array(cache.load(pid)[top : top + 1]))
        cam = grad_cam(trained.model, trained.scorer.network_inputs(image))[0]
        peaks[pid] = (top, _peak(cam))
    return trained, cache, truth, placed, pd.DataFrame(rows), peaks


@pytest.mark.parametrize("margin", [0.0, 40.0, 400.0])
def test_the_pointing_game_on_chosen_top_slices_is_a_hand_count(
    known_lesions, chosen_top_slices, margin
):
    from brainmets.evaluate.localisation import localise

    trained, cache, truth, placed, predictions, peaks = chosen_top_slices
    expected = {}
    for pid, lesions in truth.groupby("patient_id"):
        top, peak = peaks[pid]
        positions = cache.positions(pid)
        patient = known_lesions.rendered[pid]
        spacing, scale = patient.pixel_spacing_mm[0], cache.preprocess.size / patient.hu.shape[1]
        hit = pointing = False
        for r in lesions.itertuples():
            slabs = np.flatnonzero(np.abs(positions - r.z_mm) < r.diameter_mm / 2 + SLAB_MM / 2)
            if np.min(np.abs(slabs - top)) > 1:
                continue
            hit = True
            row = ((r.y_mm - patient.origin_mm[1]) / spacing + 0.5) * scale - 0.5
            column = ((r.x_mm - patient.origin_mm[0]) / spacing + 0.5) * scale - 0.5
            distance = math.hypot(peak[0] - row, peak[1] - column) * spacing / scale
            pointing |= distance <= r.diameter_mm / 2 + margin
        expected[pid] = (hit, pointing)
    result = localise(trained, cache, predictions, placed, margin_mm=margin)
    got = {r.patient_id: (bool(r.hit), bool(r.pointing)) for r in result.patients.itertuples()}
    assert got == expected
    assert {hit for hit, _ in got.values()} == {True, False}
    if margin == 400.0:  # every pixel is within reach: the pointing game is the hit rate
        assert all(pointing == hit for hit, pointing in got.values())
        ceiling = result.summary["pointing_game"]["resolution_ceiling"]
        assert ceiling == result.summary["top_slice_hit_rate"]["value"]
    game = result.summary["pointing_game"]
    assert game["value"] == pytest.approx(sum(p for _, p in got.values()) / len(got))


@pytest.mark.parametrize("size", [48, 128])
def test_a_heatmap_peaks_where_the_ceiling_assumes_it_can(size):
    """A map upsampled as Grad-CAM upsamples it, with its maximum in each cell in turn: the
    peak is that cell's centre, or the middle of its plateau at a border, one of the positions
    the pointing game's resolution ceiling tries."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    from brainmets.evaluate.localisation import NETWORK_STRIDE, heatmap_peak, reachable_peaks

    cells = math.ceil(size / NETWORK_STRIDE)
    reachable = np.array(reachable_peaks((size, size)))
    rng = np.random.default_rng(0)
    for i in range(cells):
        for j in range(cells):
            low = rng.random((1, cells, cells)).astype(np.float32) * 0.5
            low[0, i, j] = 1.0
            peak = heatmap_peak(scale_cam_image(low, (size, size))[0])
            assert np.min(np.hypot(*(reachable - peak).T)) < 1.0, (i, j, peak)
    assert heatmap_peak(np.zeros((size, size), np.float32)) is None  # a flat map has no peak
