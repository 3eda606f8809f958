"""The training loop end to end on a tiny CPU config: run files, resume, non-finite steps, DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from brainmets.config import Config, PreprocessConfig, StageLR, WeightDecay, load_config
from brainmets.data.cache import build_cache_from_arrays
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.probability import Calibration
from brainmets.model.resnet import BrainMetsNet
from brainmets.train.curriculum import build_optimizer
from brainmets.train.trainer import (
    METRIC_COLUMNS,
    TrainingInterrupted,
    clip_and_step,
    train,
)

SIZE = 32


def _make_cache(root: Path):
    """10 patients of 3 slices; positives carry a small bright lesion on one slice."""
    rng = np.random.default_rng(0)
    patients = []
    for i in range(10):
        label = int(i % 3 == 0)
        volume = rng.integers(20, 110, size=(3, SIZE, SIZE)).astype(np.uint8)
        if label:
            volume[1, 12:16, 14:18] = 240
        patients.append((f"P{i:02d}", label, volume))
    return build_cache_from_arrays(root, patients, PreprocessConfig(size=SIZE))


def _config(cache: Path, data: dict | None = None, **train) -> Config:
    return Config.model_validate(
        {
            "seed": 3,
            "data": {"cache": str(cache), "num_workers": 0, "val_fraction": 0.3, **(data or {})},
            "model": {"arch": "resnet18", "hidden": 16, "dropout": 0.4},
            "train": {
                "epochs": 3,
                "stage_epochs": [0, 1, 2],  # crosses both stage boundaries
                "batch_patients": 4,
                "lr": {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3},
                "log_every": 2,
                "checkpoint_every": 3,
                **train,
            },
        }
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    _make_cache(root)
    return root


@pytest.fixture(scope="module")
def full_run(cache_dir, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("full")
    return run, train(_config(cache_dir), run)


def test_run_directory_is_complete(full_run):
    run, summary = full_run
    for name in ("config.yaml", "environment.json", "splits.csv", "train.log", "metrics.csv",
                 "model.safetensors", "model.json", "val_predictions.csv",
                 "checkpoints/last.safetensors", "checkpoints/last.json",
                 "checkpoints/last_state.pt"):  # fmt: skip
        assert (run / name).is_file(), name
    assert next((run / "tensorboard").iterdir()).name.startswith("events.out.tfevents")

    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == [0, 1, 2] and metrics["stage"].tolist() == [1, 2, 3]
    assert np.isfinite(metrics["train_loss"]).all() and np.isfinite(metrics["val_loss"]).all()

    splits = pd.read_csv(run / "splits.csv", dtype={"patient_id": str})
    assert not splits["patient_id"].duplicated().any()
    predictions = pd.read_csv(run / "val_predictions.csv", dtype={"patient_id": str})
    assert set(predictions["patient_id"]) == set(splits.loc[splits["split"] == "val", "patient_id"])

    model, sidecar = load_checkpoint(run / "model.safetensors")
    best = metrics.loc[metrics["epoch"] == summary["best_epoch"]].iloc[0]
    # model.json keeps the sigmoid's threshold (decisions); metrics.csv shows it on the scale
    # the run reports, and names that scale.
    assert sidecar["threshold"] == pytest.approx(best["sigmoid_threshold"])
    calibration = Calibration.from_sidecar(sidecar)
    assert best["threshold"] == pytest.approx(calibration.threshold(best["sigmoid_threshold"]))
    assert best["probability_scale"] == calibration.scale
    assert sidecar["metrics"]["probability_scale"] == best["probability_scale"]
    reported = calibration.probability(predictions["logit"])
    np.testing.assert_allclose(predictions["probability"], reported)
    assert sidecar["preprocess"]["size"] == SIZE and sidecar["normalization"] == "zscore"
    assert isinstance(model, BrainMetsNet) and model.arch == "resnet18"
    # The config asked for 256^2 slices, the cache holds 32^2: the run follows the cache, says
    # so in its log, and its saved config records what the model really saw.
    assert Config().preprocess.size == 256
    assert load_config(run / "config.yaml").preprocess.size == SIZE
    assert "preprocess settings of the config differ" in (run / "train.log").read_text()
    env = json.loads((run / "environment.json").read_text())
    assert socket.gethostname() not in json.dumps(env)
    # The CPU's kernel instruction set: runs on another one may end elsewhere.
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def _assert_same_run(expected: Path, got: Path) -> None:
    """Last weights bit-identical and every metric of every epoch equal (timings aside)."""
    expected_weights = load_file(expected / "checkpoints/last.safetensors")
    got_weights = load_file(got / "checkpoints/last.safetensors")
    assert expected_weights.keys() == got_weights.keys()
    assert all(torch.equal(expected_weights[k], got_weights[k]) for k in expected_weights)
    columns = [c for c in METRIC_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(expected / "metrics.csv")[columns], pd.read_csv(got / "metrics.csv")[columns]
    )


def _tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar as TensorBoard shows them (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag != "epoch/seconds"
    }


def test_interrupted_and_resumed_run_ends_bit_identical(full_run, cache_dir, tmp_path):
    run, _ = full_run
    # 2 batches per epoch; the kill at step 4 (end of epoch 1, stage 2) comes after the periodic
    # checkpoint at step 3 (mid-epoch), so step 4 is replayed from the saved state.
    with pytest.raises(TrainingInterrupted):
        train(_config(cache_dir), tmp_path, stop_after_steps=4)
    state = torch.load(tmp_path / "checkpoints/last_state.pt", weights_only=True)
    assert (state["train_state"]["epoch"], state["train_state"]["batch"]) == (1, 1)
    train(_config(cache_dir), tmp_path, resume=True)
    _assert_same_run(run, tmp_path)
    # The stopped run had logged step 4's loss after the state of step 3; the resumed run logs
    # step 4 again. TensorBoard must show each step once, with the values of the full run.
    expected, got = _tensorboard_scalars(run), _tensorboard_scalars(tmp_path)
    assert expected["train/loss_step"] and [s for s, _ in expected["epoch/auc"]] == [2, 4, 6]
    assert got.keys() == expected.keys()
    for tag in expected:
        assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in expected[tag]])


def test_device_resident_cohort_trains_bit_identical_to_the_loader(full_run, cache_dir, tmp_path):
    """data.device_cache only changes where batches come from, never what they hold."""
    run, _ = full_run
    assert _config(cache_dir).data.device_cache == "auto"  # off on the CPU: full_run used loaders
    train(_config(cache_dir, data={"device_cache": "on"}), tmp_path)
    _assert_same_run(run, tmp_path)


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_state(full_run, cache_dir, tmp_path):
    run, _ = full_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(cache_dir), run)
    with pytest.raises(FileNotFoundError, match="last_state.pt"):
        train(_config(cache_dir), tmp_path, resume=True)


def test_non_finite_step_is_skipped_without_touching_weights_or_moments():
    torch.manual_seed(0)
    model = BrainMetsNet(arch="resnet18", hidden=8)
    model.set_trainable(("head",))
    optimizer = build_optimizer(model, 1, StageLR(), WeightDecay())
    for p in model.head.parameters():
        p.grad = torch.ones_like(p)
    assert clip_and_step(optimizer, 1.0).item() == 0.0
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}
    for p in model.head.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert clip_and_step(optimizer, 1.0).item() == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())
    assert all(torch.equal(moments[id(p)], s["exp_avg"]) for p, s in optimizer.state.items())
    assert all(s["step"].item() == 1 for s in optimizer.state.values())


@pytest.mark.parametrize("method", ["platt", "none"])
def test_best_epoch_stores_the_calibration_of_its_validation_predictions(
    cache_dir, tmp_path, method
):
    """model.json of the best epoch carries the Platt map fitted on that epoch's validation
    logits (train.calibration platt), or the plain sigmoid and why (none)."""
    from brainmets.model.probability import Calibration, fit_platt
    from brainmets.train.trainer import Trainer

    trainer = Trainer(_config(cache_dir, calibration=method), tmp_path / "run")
    try:
        rng = np.random.default_rng(0)
        labels = np.r_[np.ones(12), np.zeros(18)].astype(int)
        logits = rng.normal(0.0, 1.0, 30) + 2.5 * labels + 0.5  # ranked, biased upward
        predictions = pd.DataFrame({"patient_id": [f"V{i}" for i in range(30)], "label": labels,
                                    "probability": 1 / (1 + np.exp(-logits)), "logit": logits})  # fmt: skip
        row = dict.fromkeys(METRIC_COLUMNS, 0.5) | {"epoch": 0, "stage": 1}
        trainer._save_best(row, predictions)
    finally:
        trainer.close()
    stored = Calibration.from_sidecar(json.loads((tmp_path / "run" / "model.json").read_text()))
    if method == "platt":
        assert stored == fit_platt(labels, logits) and stored.method == "platt"
        assert stored.patients == 30
    else:
        assert stored.method == "none" and stored.note == "train.calibration is none"


# --------------------------------------------------------------------------- DDP (gloo, CPU)


def _ddp_worker(
    rank: int, world_size: int, port: int, cache: str, run: str, out: str, confidence: bool
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    summary = train(_ddp_config(Path(cache), confidence), Path(run))
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary, default=str))


def _ddp_config(cache: Path, confidence: bool = False) -> Config:
    # Deterministic up to float summation order: no dropout, no augmentation. Epoch 0 is
    # stage 1 (all BatchNorm frozen, so a rank's half-batch computes what the whole batch
    # would); epoch 1 unfreezes layer4, whose BatchNorm then sees per-rank batch statistics.
    cfg = _config(cache, epochs=2, stage_epochs=[0, 1, 12])
    cfg.model.dropout = 0.0
    cfg.augment.enabled = False
    # A weight that makes the term matter against the BCE (the specified 0.15 would too).
    cfg.train.confidence = cfg.train.confidence.model_copy(
        update={"enabled": confidence, "weight": 5.0}
    )
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CANNOT_START = {  # what is wrong -> (config change, what the error must say)
    "no cache": ({}, "no-such-cache"),
    "odd batch": ({"batch_patients": 5}, "train.batch_patients=5 is the batch of all 2 "
                  "processes together and must split evenly between them: use 4 or 6"),
    "one GPU": ({"device": "cuda:0"}, "puts all 2 torchrun processes on one GPU"),
}  # fmt: skip


def _ddp_failing_worker(rank: int, world_size: int, port: int, run: str, out: str, case: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))  # fmt: skip
    change, _ = _CANNOT_START[case]
    cfg = _ddp_config(Path(run) / "no-such-cache")
    cfg.train = cfg.train.model_copy(update=change)
    reason = "train started"
    try:
        train(cfg, Path(run))
    except Exception as err:  # on every rank
        reason = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"reason": reason, "group_left": not torch.distributed.is_initialized()})
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_CANNOT_START))
def test_ddp_run_that_cannot_start_leaves_the_process_group(tmp_path, case):
    """A run that fails while it builds (no cache; a batch that does not split between the
    ranks; every rank pinned to one GPU) says why on every rank and leaves the process group
    it joined."""
    run, out = tmp_path / "ddp", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    mp.spawn(_ddp_failing_worker, args=(2, _free_port(), str(run), str(out), case), nprocs=2)
    for rank in range(2):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert _CANNOT_START[case][1] in result["reason"]
        assert result["group_left"], rank
    if case == "no cache":
        assert "training could not start" in (run / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("confidence", [False, True])
def test_ddp_two_ranks_agree_and_match_one_process(cache_dir, tmp_path, confidence):
    """With the confidence term too: it must compare the class means of the whole batch (each
    rank holds half of it), or DDP trains another loss than one process does."""
    run, out = tmp_path / "ddp", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(cache_dir), str(run), str(out), confidence),
             nprocs=2)  # fmt: skip
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["final"] == {**ranks[1]["final"], "seconds": ranks[0]["final"]["seconds"]}

    single = train(_ddp_config(cache_dir, confidence), tmp_path / "single")
    ddp_rows = pd.read_csv(run / "metrics.csv")
    one_rows = pd.read_csv(tmp_path / "single" / "metrics.csv")
    # Stage 1: the same global batch gives the same result up to summation order.
    for key in ("train_loss", "val_loss", "auc", "mean_pos", "mean_neg"):
        assert ddp_rows.loc[0, key] == pytest.approx(one_rows.loc[0, key], abs=1e-6), key
    assert single["final"]["epoch"] == 1 and ddp_rows["stage"].tolist() == [1, 2]


def test_one_class_validation_ranks_epochs_by_validation_loss(tmp_path, caplog):
    """A manifest split that puts only negatives in val leaves AUC undefined every epoch; the
    first epoch must not stay "best" for the whole run: the validation loss ranks them."""
    rng = np.random.default_rng(0)
    patients = [
        (f"P{i:02d}", int(i % 3 == 0), rng.integers(20, 110, (3, SIZE, SIZE)).astype(np.uint8))
        for i in range(10)
    ]
    val = {"P01", "P02", "P04"}  # negatives only
    splits = {pid: ("val" if pid in val else "train") for pid, _, _ in patients}
    build_cache_from_arrays(tmp_path / "cache", patients, PreprocessConfig(size=SIZE), splits)
    with caplog.at_level("WARNING", logger="brainmets.train.trainer"):
        summary = train(_config(tmp_path / "cache", epochs=4, best_metric="auc"), tmp_path / "run")
    assert "validation patients are all negative: auc is undefined" in caplog.text
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["auc"].isna().all()
    assert summary["best_metric"] == "val_loss"
    assert summary["best_epoch"] == int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
    assert (
        json.loads((tmp_path / "run" / "model.json").read_text())["epoch"] == summary["best_epoch"]
    )


def test_resume_needs_no_pretrained_weights_file(cache_dir, tmp_path):
    """The saved state holds every weight: a run resumes after its RadImageNet file moved, and
    ends as the run that was never interrupted."""
    import torchvision

    weights = tmp_path / "radimagenet_resnet18.pt"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # torchvision key layout
    cfg = _config(cache_dir)
    cfg = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"pretrained": str(weights)})}
    )
    train(cfg, tmp_path / "whole")
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "resumed", stop_after_steps=4)
    weights.unlink()
    train(cfg, tmp_path / "resumed", resume=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "resumed")


def test_a_curriculum_cut_short_by_the_epoch_count_is_said(cache_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="brainmets.train.trainer"):
        train(_config(cache_dir, epochs=2, stage_epochs=[0, 1, 5]), tmp_path)
    assert (
        "train.epochs is 2, so stage 3 (from epoch 5) never starts (train.stage_epochs [0, 1, 5])"
    ) in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("one_shape", [False, True], ids=["dynamic", "pad_slices"])
def test_compiled_training_trains_what_eager_training_does(cache_dir, tmp_path, one_shape):
    """``train.compile`` through a curriculum stage change (the frozen prefix and BatchNorm
    modes change, so the step is compiled again), with varying batch shapes (a dynamic graph)
    or one shape (``pad_slices``, a static graph): the same training losses as eager training,
    and weights that give the same validation predictions (validation runs the bare model),
    up to the fused kernels' rounding."""
    eager_cfg, compiled_cfg = _ddp_config(cache_dir), _ddp_config(cache_dir)
    compiled_cfg.train.compile = True
    if one_shape:
        for cfg in (eager_cfg, compiled_cfg):
            cfg.train.max_slices, cfg.train.pad_slices = 3, True
    train(eager_cfg, tmp_path / "eager")
    graphs = counters["stats"]["unique_graphs"]
    train(compiled_cfg, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= graphs + 2  # a graph per stage at least
    eager = pd.read_csv(tmp_path / "eager" / "metrics.csv")
    compiled = pd.read_csv(tmp_path / "compiled" / "metrics.csv")
    assert compiled["stage"].tolist() == [1, 2]
    for key in ("train_loss", "val_loss", "mean_pos", "mean_neg"):
        np.testing.assert_allclose(compiled[key], eager[key], rtol=0, atol=1e-4, err_msg=key)
