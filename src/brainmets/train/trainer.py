"""The training loop: curriculum, device path, validation, checkpoints and resume.

``train(cfg, run_dir)`` trains ``BrainMetsNet`` on a prepared cache and leaves a
self-contained run folder (its files: :mod:`brainmets.rundir`). One step reads top to bottom in
:meth:`Trainer.train_step`. Why the device path looks as it does: the uint8 slices are windowed,
augmented and z-scored on the device, and a step never waits for the host (the loss and the
skip flag of a non-finite step stay on the device and are read every ``train.log_every``
steps; the fused AdamW skips a non-finite update itself, as under ``GradScaler``). Resume state:
:mod:`brainmets.train.state`; DDP: :mod:`brainmets.train.distributed`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from brainmets import PER_RANK_LOGGER, rundir
from brainmets.config import Config, save_config
from brainmets.data.augment import ClassConditionalAugment, class_dependent_warning
from brainmets.data.cache import PatientCache
from brainmets.data.dataset import (
    PatientBatch,
    PatientBatchSampler,
    PatientDataset,
    collate_patients,
    split_patients,
)
from brainmets.data.device_cache import DeviceSliceStore, use_device_cache
from brainmets.data.labels import SPLITS
from brainmets.data.normalize import normalize_slices, uint8_to_unit
from brainmets.device import resolve_device
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.metrics import best_f1_threshold, patient_metrics, separation_band
from brainmets.model.checkpoint import save_checkpoint
from brainmets.model.pretrained import load_pretrained_backbone, warn_random_init
from brainmets.model.resnet import BrainMetsNet
from brainmets.ranking import RankingVerdict
from brainmets.train.batchnorm_stats import (
    calibrate_batchnorm,
    norm_statistics,
    restore_non_finite_norm_statistics,
)
from brainmets.train.curriculum import (
    build_optimizer,
    lr_factor,
    scale_learning_rates,
    stage_for_epoch,
    trainable_blocks,
)
from brainmets.train.distributed import gather_with_grad, init_distributed
from brainmets.train.ema import WeightAverage
from brainmets.train.folds import fold_assignment, fold_splits, write_assignment
from brainmets.train.health import (
    OperatingThreshold,
    ValidationScores,
    batch_mix_warning,
    epoch_warnings,
    run_summary,
)
from brainmets.train.losses import patient_loss
from brainmets.train.run_folder import RunFolder
from brainmets.train.scale import EpochScale, epoch_scale
from brainmets.train.selection import HEADLINE, improves
from brainmets.train.state import (
    TrainState,
    capture_rng,
    read_resume_state,
    restore_rng,
    save_resume_state,
)

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "epoch",
    "stage",
    "train_loss",
    "val_loss",
    "auc",
    "f1",
    "threshold",
    "sensitivity",
    "specificity",
    "mean_pos",
    "mean_neg",
    "separation",
    "probability_scale",
    "sigmoid_threshold",
    "sigmoid_separation",
    "lr_head",
    "skipped_steps",
    "seconds",
]


def _json_value(value: Any) -> Any:
    """A metrics.csv value for model.json: a word as it is, a non-finite number as null."""
    if isinstance(value, str):
        return value
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


# How train.log names each row's probability scale (metrics.csv: probability_scale).
_SCALE_WORDS = {"platt": "Platt-calibrated", "sigmoid": "the sigmoid, not calibrated"}


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` test hook, like a kill: nothing more is saved."""


# --------------------------------------------------------------------------- setup


def build_model(cfg: Config, *, pretrained: bool = True) -> BrainMetsNet:
    """The configured network; ``pretrained=False`` skips the backbone weights file (a resumed
    run loads every weight from its saved state, and the file may have moved since)."""
    return _built_model(cfg, pretrained)[0]


def _built_model(cfg: Config, pretrained: bool) -> tuple[BrainMetsNet, dict[str, str] | None]:
    """The configured network and, when it starts from a weights file, that file's name and
    SHA-256 (recorded in model.json: which download the run started from)."""
    m = cfg.model
    model = BrainMetsNet(
        arch=m.arch,
        pooling=m.pooling,
        conv1_reduce=m.conv1_reduce,
        dropout=m.dropout,
        hidden=m.hidden,
        lse_temperature=m.lse_temperature,
        stride_in_1x1=m.stride_in_1x1,
    )
    if not pretrained:
        return model, None
    if m.pretrained.lower() == "none":
        return model, None  # the trainer warns, once it knows its training patients
    report = load_pretrained_backbone(model, m.pretrained)  # logs its own report
    return model, {"file": report.source, "sha256": report.sha256}


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``optimizer``'s parameters and step, skipping a non-finite step.

    Returns ``found_inf`` (float 0-d tensor on the device, 1.0 = skipped) without a host sync:
    the fused AdamW reads it on the device and leaves parameters, moments and step counts
    untouched when it is set (the mechanism ``GradScaler`` uses).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    found_inf = (~torch.isfinite(total_norm)).to(torch.float32)
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return found_inf


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One training run; ``train()`` below is the entry point."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        stop_after_steps: int | None = None,
        progress: bool = True,
    ) -> None:
        if cfg.data.cache is None:
            raise ValueError("data.cache is not set: point it at a `brainmets prepare` output")
        self.cfg = cfg
        self.stop_after_steps = stop_after_steps
        self.progress = progress
        self.writer = None
        self.dist = init_distributed(cfg.train.device)
        self.folder = RunFolder(run_dir, is_main=self.dist.is_main)
        self.run_dir = self.folder.path
        self.ckpt_dir = self.folder.checkpoints
        self.state_path = self.folder.state_path
        try:
            self.folder.claim()  # one run per folder: a second is refused before it writes
            self._check_world(cfg)
            self.device = resolve_device(cfg.train.device, self.dist.local_rank)
            self.cuda = self.device.type == "cuda"
            self.folder.check(resume)
            self.dist.barrier()
            self.folder.open_log()
            self._build(resume)
        except BaseException as err:
            self.folder.log_failed_start(err)
            # Leave the process group this run joined, so that the caller can start again.
            self.close()
            if not resume:
                self.folder.undo_start()
            raise

    def _build(self, resume: bool) -> None:
        """Everything after the run directory and its log: data, model, state, writers."""
        self.cache = PatientCache(self.cfg.data.cache)
        cfg = self.cfg = self._config_as_cached(self.cfg)
        self.splits = self._make_splits(resume)
        self.best_metric = self._choose_best_metric()
        unreached = [
            f"stage {k + 1} (from epoch {start})"
            for k, start in enumerate(cfg.train.stage_epochs)
            if start >= cfg.train.epochs
        ]
        if unreached:
            log.warning(
                "train.epochs is %d, so %s never %s (train.stage_epochs %s): the curriculum "
                "is cut short",
                cfg.train.epochs, " and ".join(unreached),
                "start" if len(unreached) > 1 else "starts", list(cfg.train.stage_epochs),
            )  # fmt: skip

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model, self.pretrained_weights = _built_model(cfg, pretrained=not resume)
        if not resume and cfg.model.pretrained.lower() == "none":
            # The BatchNorm estimate reads at most the training patients there are.
            warn_random_init(min(cfg.train.bn_calibration_patients, len(self.splits["train"])))
        self.model = self.model.to(self.device)
        if self.cuda and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.cuda:
            # cuDNN autotuning pays when shapes repeat: always with pad_slices; otherwise every
            # new slice count would be tuned again, so it stays with the heuristics.
            torch.backends.cudnn.benchmark = cfg.train.pad_slices
        # Dropout differs between ranks, as it would between the patients of one big batch.
        torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.aug_generator = torch.Generator(device=self.device)
        self.aug_generator.manual_seed(cfg.seed + 7_919 * (self.dist.rank + 1))
        self.augment = (
            ClassConditionalAugment.from_config(cfg.augment) if cfg.augment.enabled else None
        )
        if self.dist.is_main and (leak := class_dependent_warning(cfg.augment)):
            log.warning(leak)

        self._build_data()
        self.ema = self._weight_average()

        self.state = TrainState()
        self.stage: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.forward_model: torch.nn.Module = self.model
        self._loss_sum = torch.zeros((), device=self.device)
        self._skipped = torch.zeros((), device=self.device)
        # BatchNorm running statistics at the start of the epoch in progress (see fit).
        self._norm_snapshot: dict[str, torch.Tensor] | None = None
        if resume:
            self._load_state()
        self.writer = self._open_tensorboard()
        if self.dist.is_main:
            save_config(cfg, self.run_dir / rundir.CONFIG)
            atomic_write_text(
                self.run_dir / rundir.ENVIRONMENT,
                json.dumps(rundir.environment_info(self.device, self.dist.world_size), indent=2)
                + "\n",
            )

    def _config_as_cached(self, cfg: Config) -> Config:
        """The config with the cache's preprocessing: the cache is what the model will see, and
        the saved config must say so."""
        if cfg.preprocess == self.cache.preprocess:
            return cfg
        ours, cached = cfg.preprocess.model_dump(), self.cache.preprocess.model_dump()
        changed = {k: f"{ours[k]} -> {cached[k]}" for k in ours if ours[k] != cached[k]}
        log.warning(
            "preprocess settings of the config differ from those %s was prepared with (%s); "
            "training uses the cache as prepared, and config.yaml records that. To change "
            "them, run `brainmets prepare --config` with this config into a new cache.",
            cfg.data.cache,
            ", ".join(f"{k}: {v}" for k, v in changed.items()),
        )
        return cfg.model_copy(update={"preprocess": self.cache.preprocess})

    def _build_data(self) -> None:
        """The training patients with their sampler, this rank's validation patients, and the
        device copies of both when they fit."""
        cfg = self.cfg
        self.train_set = PatientDataset(
            self.cache,
            self.splits["train"],
            cfg.train.max_slices,
            train=True,
            seed=cfg.seed,
            pad_slices=cfg.train.pad_slices,
        )
        self.sampler = PatientBatchSampler(
            self.train_set.labels,
            cfg.train.batch_patients,
            pos_fraction=cfg.train.pos_fraction,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        mix = batch_mix_warning(self.sampler.n_pos, self.sampler.n_neg, cfg.train.pos_fraction)
        if mix and self.dist.is_main:
            log.warning(mix)
        val_local = self.splits["val"][self.dist.rank :: self.dist.world_size]
        self.val_set = PatientDataset(self.cache, val_local, train=False)
        self.train_store = self.val_store = None
        if use_device_cache(cfg.data.device_cache, [self.train_set, self.val_set], self.device):
            self.train_store = DeviceSliceStore(self.train_set, self.device)
            self.val_store = DeviceSliceStore(self.val_set, self.device)
            log.info(
                "device cache: %d train + %d validation slices held on %s (%.2f GB)",
                self.train_store.images.shape[0],
                self.val_store.images.shape[0],
                self.device,
                (self.train_store.images.numel() + self.val_store.images.numel()) / 1e9,
            )

    def _check_world(self, cfg: Config) -> None:
        """Settings that cannot work with this many torchrun processes, said before any work."""
        world = self.dist.world_size
        if world <= 1:
            return
        if cfg.train.device.startswith("cuda:"):
            raise ValueError(
                f"train.device {cfg.train.device!r} puts all {world} torchrun processes on one "
                "GPU; use cuda or auto: each process then takes its local rank's GPU (choose "
                "the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        patients = cfg.train.batch_patients
        if patients % world:
            lower, upper = (patients // world) * world, (patients // world + 1) * world
            choices = " or ".join(str(n) for n in (lower, upper) if n > 0)
            raise ValueError(
                f"train.batch_patients={patients} is the batch of all {world} processes "
                f"together and must split evenly between them: use {choices} "
                f"(--set train.batch_patients={upper})"
            )

    # ------------------------------------------------------------------ run directory
    def _open_tensorboard(self):
        """Every scalar is logged at the optimiser step. On resume, events written after the
        saved state (by the run that was stopped) are purged from the view: the resumed run
        writes those steps again, so each shows once, as in an uninterrupted run."""
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # The saved state includes what was logged at its own step (logging comes first).
        purge = self.state.global_step + 1 if self.state.global_step else None
        return SummaryWriter(str(self.run_dir / rundir.TENSORBOARD), purge_step=purge)

    def _make_splits(self, resume: bool) -> dict[str, list[str]]:
        path = self.run_dir / rundir.SPLITS
        if resume and path.is_file():
            table = pd.read_csv(path, dtype={"patient_id": str, "split": str})
            splits = {s: table.loc[table["split"] == s, "patient_id"].tolist() for s in SPLITS}
        elif self.cfg.data.folds > 1:
            # Cross-validation: the folds of every non-test patient, recorded in the run so
            # that the ensemble can check its members agree on them.
            index, data = self.cache.index, self.cfg.data
            assignment = fold_assignment(index, data.folds, self.cfg.seed)
            splits = fold_splits(index, assignment, data.fold)
            if self.dist.is_main:
                write_assignment(self.run_dir / rundir.FOLDS, assignment)
                rows = [(p, s) for s, ids in splits.items() for p in ids]
                atomic_write_csv(path, pd.DataFrame(rows, columns=["patient_id", "split"]))
        else:
            index = self.cache.index
            splits = split_patients(
                index["patient_id"].tolist(),
                index["label"].to_numpy(),
                val_fraction=self.cfg.data.val_fraction,
                seed=self.cfg.seed,
                given_split=index["split"].tolist() if "split" in index else None,
            )
            if self.dist.is_main:
                rows = [(p, s) for s, ids in splits.items() for p in ids]
                atomic_write_csv(path, pd.DataFrame(rows, columns=["patient_id", "split"]))
        for needed in ("train", "val"):
            if not splits.get(needed):
                raise ValueError(f"the {needed} split of {self.cfg.data.cache} is empty")
        counts = {s: len(ids) for s, ids in splits.items()}
        log.info("patients per split: %s", counts)
        return splits

    # ------------------------------------------------------------------ curriculum
    def enter_stage(self, stage: int, *, restoring: bool = False) -> None:
        """Freeze/unfreeze for ``stage``, rebuild the optimiser (carrying the state of the
        parameters that keep training) and the DDP wrapper around the new trainable set.
        ``restoring``: the stage of a saved state, said in the "resumed" line instead."""
        self.model.set_trainable(trainable_blocks(stage))
        self.optimizer = build_optimizer(
            self.model, stage, self.cfg.train.lr, self.cfg.train.weight_decay, self.optimizer
        )
        self.stage = stage
        self.forward_model = self.model  # drop the old wrapper (and its gradient hooks) first
        gc.collect()
        wrapped: torch.nn.Module = self.model
        if self.dist.enabled:
            wrapped = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None
            )
        if self.cfg.train.compile:
            # One batch shape (pad_slices) compiles one static graph; otherwise the slice count
            # changes every step and a dynamic-shape graph avoids a recompile for each.
            wrapped = torch.compile(wrapped, dynamic=not self.cfg.train.pad_slices)
        self.forward_model = wrapped
        log.log(
            logging.DEBUG if restoring else logging.INFO,
            "stage %d: training %s", stage, ", ".join(trainable_blocks(stage)),
        )  # fmt: skip

    # ------------------------------------------------------------------ device path
    def _autocast(self):
        if self.cuda and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _inputs(self, batch: PatientBatch, *, train: bool) -> torch.Tensor:
        x = uint8_to_unit(batch.images)
        if train and self.augment is not None:
            x = self.augment(x, batch.patient_index, batch.labels, self.aug_generator)
        x = normalize_slices(x, self.cfg.model.normalization)
        if self.cuda and self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def loader(self, dataset: PatientDataset, **kwargs: Any) -> DataLoader:
        # A private generator: the DataLoader draws its worker base seed from it, not from the
        # global RNG, which would otherwise shift dropout after a resume.
        generator = torch.Generator()
        generator.manual_seed(self.cfg.seed * 100_003 + self.state.epoch)
        return DataLoader(
            dataset,
            collate_fn=collate_patients,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.cuda,
            generator=generator,
            **kwargs,
        )

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, epoch: int) -> None:
        cfg = self.cfg.train
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch = self.state.batch
        self.train_set.set_epoch(epoch)
        if self.train_store is not None:
            loader = self.train_store.batches(self.sampler)
        else:
            loader = self.loader(self.train_set, batch_sampler=self.sampler)
        self.model.train()
        bar = tqdm(
            loader,
            total=self.sampler.num_batches(),
            initial=self.state.batch,
            desc=f"epoch {epoch} (stage {self.stage})",
            disable=not (self.dist.is_main and self.progress),
            dynamic_ncols=True,
        )
        for batch in bar:
            loss, found_inf = self.train_step(batch.to(self.device, non_blocking=True))
            self._loss_sum += torch.where(found_inf > 0, torch.zeros_like(loss), loss)
            self._skipped += found_inf
            self.state.batch += 1
            self.state.global_step += 1
            self.state.epoch_steps += 1
            if self.state.global_step % cfg.log_every == 0:
                self._log_progress(bar, loss)
            if self.state.global_step % cfg.checkpoint_every == 0:
                self._save_last()
            if (
                self.stop_after_steps is not None
                and self.state.global_step >= self.stop_after_steps
            ):
                raise TrainingInterrupted(f"stopped after {self.state.global_step} steps")
        bar.close()

    def train_step(self, batch: PatientBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._inputs(batch, train=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.forward_model(x, batch.patient_index, batch.num_patients)
        loss, _ = patient_loss(
            out.patient_logits,
            batch.labels,
            pos_weight=self.cfg.train.pos_weight,
            confidence=self.cfg.train.confidence,
            gather=gather_with_grad if self.dist.enabled else None,
        )
        loss.backward()
        self._schedule_learning_rate()
        found_inf = clip_and_step(self.optimizer, self.cfg.train.grad_clip)
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach(), found_inf

    def _schedule_learning_rate(self) -> None:
        cfg = self.cfg.train
        if cfg.lr_warmup_epochs == 0 and cfg.lr_schedule == "constant":
            return
        per_epoch = self.sampler.num_batches()
        factor = lr_factor(
            self.state.global_step, cfg.epochs * per_epoch, cfg.lr_warmup_epochs * per_epoch,
            cfg.lr_schedule,
        )  # fmt: skip
        scale_learning_rates(self.optimizer, cfg.lr, factor)

    def _epoch_loss(self) -> tuple[float, int]:
        """(loss summed over this epoch's finite steps, steps skipped): the device sums plus
        what ``_save_last`` already moved into the saved state. Reads the device."""
        loss_sum = self._loss_sum.item() + self.state.epoch_loss_sum
        return loss_sum, int(self._skipped.item()) + self.state.epoch_skipped

    def _log_progress(self, bar: tqdm, loss: torch.Tensor) -> None:
        """The only per-step host sync, every ``train.log_every`` steps."""
        loss_sum, skipped = self._epoch_loss()
        running = loss_sum / max(self.state.epoch_steps - skipped, 1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", loss.item(), self.state.global_step)
        if skipped:
            log.warning("non-finite loss: %d step(s) skipped so far this epoch", skipped)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], pd.DataFrame]:
        """Patient-level validation over all ranks; every rank returns the same numbers. With
        ``train.ema_epochs``, of the weight average: the weights the run selects and saves."""
        model = self.scored_model()
        model.eval()
        logits, labels, ids = [], [], []
        if len(self.val_set):
            size = self.cfg.train.batch_patients
            if self.val_store is not None:
                order = range(len(self.val_set))
                loader = self.val_store.batches(order[i : i + size] for i in order[::size])
            else:
                loader = self.loader(self.val_set, batch_size=size)
            bar = tqdm(
                loader,
                total=math.ceil(len(self.val_set) / size),
                desc="validate",
                leave=False,
                disable=not (self.dist.is_main and self.progress),
                dynamic_ncols=True,
            )
            for batch in bar:
                batch = batch.to(self.device, non_blocking=True)
                with self._autocast():
                    out = model(
                        self._inputs(batch, train=False), batch.patient_index, batch.num_patients
                    )
                logits.append(out.patient_logits.float().cpu())
                labels.append(batch.labels.cpu())
                ids += batch.patient_ids
        local = (
            torch.cat(logits) if logits else torch.zeros(0),
            torch.cat(labels) if labels else torch.zeros(0),
            ids,
        )
        parts = self.dist.all_gather(local)
        by_id = {
            pid: (float(lg), float(lb))
            for part_logits, part_labels, part_ids in parts
            for pid, lg, lb in zip(
                part_ids, part_logits.tolist(), part_labels.tolist(), strict=True
            )
        }
        order = self.splits["val"]
        all_logits = torch.tensor([by_id[p][0] for p in order])
        all_labels = torch.tensor([by_id[p][1] for p in order])
        val_loss, _ = patient_loss(
            all_logits,
            all_labels,
            pos_weight=self.cfg.train.pos_weight,
            confidence=self.cfg.train.confidence,
        )
        probs = torch.sigmoid(all_logits).numpy().astype(np.float64)
        y = all_labels.numpy().astype(np.int64)
        threshold, _ = best_f1_threshold(y, probs)
        metrics = patient_metrics(y, probs, threshold)
        metrics.update(val_loss=float(val_loss), threshold=float(threshold))
        predictions = pd.DataFrame(
            {
                "patient_id": order,
                "label": y,
                "probability": probs,
                "logit": all_logits.double().numpy(),
            }
        )
        return metrics, predictions

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        loss_sum, skipped = self._epoch_loss()
        loss_sum = self.dist.reduce_mean(loss_sum)
        steps = self.state.epoch_steps
        train_loss = loss_sum / max(steps - skipped, 1) if steps - skipped > 0 else math.nan
        metrics, predictions = self.validate()
        # Thresholds and probabilities on the scale these weights would be reported on.
        scale = epoch_scale(predictions, method=self.cfg.train.calibration, seed=self.cfg.seed)
        row = {
            "epoch": epoch,
            "stage": self.stage,
            "train_loss": train_loss,
            "val_loss": metrics["val_loss"],
            **{k: metrics[k] for k in ("auc", "f1", "sensitivity", "specificity")},
            **scale.row_values(predictions, metrics["threshold"]),
            "lr_head": self._lr_of("head"),
            "skipped_steps": skipped,
            "seconds": round(seconds, 3),
        }
        improved = improves(self.best_metric, row, self._best_row())
        if improved:
            self.state.best_value = float(row[HEADLINE[self.best_metric]])
            self.state.best_epoch = epoch
        self._health_checks(row, predictions, scale, skipped)
        self.state.history.append(row)
        self.state.skipped_steps += skipped
        if self.dist.is_main:
            if improved:
                self._save_best(row, predictions, scale)
            atomic_write_csv(
                self.run_dir / rundir.METRICS,
                pd.DataFrame(self.state.history, columns=METRIC_COLUMNS),
            )
            for key in METRIC_COLUMNS:
                value = row[key]
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, self.state.global_step)
            self.writer.flush()
        log.info(
            "epoch %d stage %d: train_loss %.4f val_loss %.4f auc %.3f f1 %.3f sens %.3f spec "
            "%.3f at threshold %.2f; p+ %.3f p- %.3f separation %.3f (%s) [probabilities: %s]%s",
            epoch, self.stage, row["train_loss"], row["val_loss"], row["auc"], row["f1"],
            row["sensitivity"], row["specificity"], row["threshold"], row["mean_pos"],
            row["mean_neg"], row["separation"], separation_band(row["separation"]),
            _SCALE_WORDS[row["probability_scale"]], " *best*" if improved else "",
        )  # fmt: skip
        return row

    def _choose_best_metric(self) -> str:
        """``train.best_metric``, unless the validation patients are all of one class: then
        AUC, F1 and separation are undefined every epoch, and the first epoch would stay
        "best" for the whole run. The validation loss still ranks the epochs."""
        metric = self.cfg.train.best_metric
        labels = {int(self.cache.row(p)["label"]) for p in self.splits["val"]}
        if metric != "val_loss" and len(labels) == 1:
            log.warning(
                "the %d validation patients are all %s: %s is undefined, so the best epoch "
                "is chosen by val_loss; the F1 threshold is a guess and no calibration is "
                "fitted (give val patients of both classes in the manifest's split column)",
                len(self.splits["val"]),
                "positive" if labels == {1} else "negative",
                metric,
            )
            return "val_loss"
        return metric

    def _weight_average(self) -> WeightAverage | None:
        """``train.ema_epochs`` > 0: a moving average of the weights (``train/ema.py``)."""
        horizon = self.cfg.train.ema_epochs
        if horizon <= 0:
            return None
        return WeightAverage(self.model, horizon, self.sampler.num_batches())

    def scored_model(self) -> torch.nn.Module:
        """The weights validation scores and the run saves: the average, or the weights."""
        return self.model if self.ema is None else self.ema.module

    def _lr_of(self, block: str) -> float:
        for group in self.optimizer.param_groups:
            if group["name"].startswith(block + "/"):
                return float(group["lr"])
        return math.nan

    def _best_row(self) -> dict[str, Any] | None:
        return next((r for r in self.state.history if r["epoch"] == self.state.best_epoch), None)

    def _health_checks(
        self, row: dict[str, Any], predictions: pd.DataFrame, scale: EpochScale, skipped: int
    ) -> None:
        """The troubleshooting signals of :mod:`brainmets.train.health`, at the threshold the
        saved model now carries (decided on the sigmoid, shown on its reported scale)."""
        best = row if self.state.best_epoch == row["epoch"] else self._best_row()
        best = best or row
        for warning in epoch_warnings(
            row,
            ValidationScores(
                labels=predictions["label"].to_numpy(),
                sigmoid=predictions["probability"].to_numpy(),
                reported=scale.calibration.probability(predictions["logit"].to_numpy()),
            ),
            OperatingThreshold(  # a resume state's rows from before the column: one scale
                sigmoid=float(best.get("sigmoid_threshold", best["threshold"])),
                shown=float(best["threshold"]),
            ),
            self.state.history,
            self.cfg.train,
        ):
            log.warning(warning)
        if skipped:
            log.warning(
                "epoch %d: %d step(s) skipped because the loss or gradients were not finite",
                row["epoch"], skipped,
            )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _sidecar(self, row: dict[str, Any] | None) -> dict[str, Any]:
        return {
            # The sigmoid's: decisions are taken there (the reported one is the calibration's).
            "threshold": None if row is None else float(row["sigmoid_threshold"]),
            "epoch": None if row is None else int(row["epoch"]),
            "metrics": None
            if row is None
            else {k: _json_value(row.get(k)) for k in METRIC_COLUMNS},
            "preprocess": self.cache.preprocess.model_dump(mode="json"),
            "normalization": self.cfg.model.normalization,
            "config_hash": self.cfg.config_hash(),
            "best_metric": self.best_metric,
            "pretrained_weights": self.pretrained_weights,
        }

    def _save_best(
        self, row: dict[str, Any], predictions: pd.DataFrame, scale: EpochScale | None = None
    ) -> None:
        """The best epoch's weights, with the ranking verdict and the probability calibration
        of the same validation predictions (``brainmets.train.scale``: the rule of
        ``brainmets.model.probability``), and those predictions on the reported scale."""
        if scale is None:
            scale = epoch_scale(predictions, method=self.cfg.train.calibration, seed=self.cfg.seed)
        if scale.calibration.method == "none":
            log.info("epoch %d: probabilities not calibrated (%s)", row["epoch"],
                     scale.calibration.note)  # fmt: skip
        sidecar = {
            **self._sidecar(row),
            "calibration": scale.calibration.to_json(),
            "ranking": scale.ranking.to_json(),
        }
        save_checkpoint(self.scored_model(), self.run_dir / rundir.MODEL, sidecar)
        atomic_write_csv(self.run_dir / rundir.VAL_PREDICTIONS, scale.reported(predictions))

    def _save_last(self) -> None:
        """Everything needed to resume, written atomically (rank 0; RNG states of all ranks)."""
        rng = self.dist.all_gather(capture_rng(self.aug_generator, self.device))
        self.state.epoch_loss_sum += self._loss_sum.item()
        self.state.epoch_skipped += int(self._skipped.item())
        self._loss_sum.zero_()
        self._skipped.zero_()
        if not self.dist.is_main:
            return
        last_row = self.state.history[-1] if self.state.history else None
        save_checkpoint(self.model, self.ckpt_dir / rundir.LAST_WEIGHTS, self._sidecar(last_row))
        payload = {
            "train_state": asdict(self.state),
            "stage": self.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "world_size": self.dist.world_size,
            "config_hash": self.cfg.config_hash(),
            "norm_snapshot": self._norm_snapshot,
            "ema": None if self.ema is None else self.ema.state_dict(),
        }
        save_resume_state(self.state_path, payload)

    def _load_state(self) -> None:
        payload = read_resume_state(self.state_path, self.device)
        if payload["config_hash"] != self.cfg.config_hash():
            log.warning("resuming %s with a changed config", self.run_dir)
        self.state = TrainState(**payload["train_state"])
        last = self.ckpt_dir / rundir.LAST_WEIGHTS
        if last.with_suffix(".json").is_file():  # where the weights came from, kept on resume
            saved = json.loads(last.with_suffix(".json").read_text())
            self.pretrained_weights = saved.get("pretrained_weights")
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            if payload.get("ema") is not None:
                self.ema.load_state_dict(payload["ema"])
            else:  # a state saved without an average: it starts from the resumed weights
                log.warning("resuming without a saved weight average: it starts afresh")
                self.ema = self._weight_average()
        self._norm_snapshot = payload.get("norm_snapshot")  # states saved before it: None
        self.enter_stage(payload["stage"], restoring=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        rng = payload["rng"]
        if payload["world_size"] != self.dist.world_size:
            log.warning(
                "resuming a %d-process run on %d processes: RNG streams restart from the seed",
                payload["world_size"], self.dist.world_size,
            )  # fmt: skip
        else:
            restore_rng(rng[self.dist.rank], self.aug_generator, self.device)
        log.info(
            "resumed %s at epoch %d, batch %d (step %d), saved in stage %d",
            self.run_dir, self.state.epoch, self.state.batch, self.state.global_step, self.stage,
        )  # fmt: skip

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg.train
        if self.state.epoch >= cfg.epochs:
            log.info(
                "%s is complete: %d of %d epochs trained; to train on, resume with a larger "
                "train.epochs (--set train.epochs=N)",
                self.run_dir, self.state.epoch, cfg.epochs,
            )  # fmt: skip
        if self.state.global_step == 0 and self.state.epoch == 0:
            self._calibrate_batchnorm()
            self.ema = self._weight_average()  # of the calibrated statistics
        for epoch in self._epochs():
            stage = stage_for_epoch(epoch, cfg.stage_epochs)
            if stage != self.stage:
                self.enter_stage(stage)
            start = time.perf_counter()
            if self.state.batch == 0 or self._norm_snapshot is None:
                # A mid-epoch resume keeps the epoch start's copy from the saved state: the
                # statistics it loaded may already be the poisoned ones.
                self._norm_snapshot = norm_statistics(self.model)
            self._train_epoch(epoch)
            poisoned = restore_non_finite_norm_statistics(self.model, self._norm_snapshot)
            if poisoned:  # this rank's own statistics: BatchNorm is not synchronised
                logging.getLogger(PER_RANK_LOGGER).warning(
                    "epoch %d: %d BatchNorm running statistics became non-finite (a skipped "
                    "step's forward pass) and were restored to their values at the epoch's "
                    "start, e.g. %s",
                    epoch, len(poisoned), poisoned[0],
                )  # fmt: skip
            self._end_epoch(epoch, time.perf_counter() - start)
            self.state.epoch = epoch + 1
            self.state.batch = 0
            self.state.epoch_loss_sum = 0.0
            self.state.epoch_steps = 0
            self.state.epoch_skipped = 0
            self._loss_sum.zero_()
            self._skipped.zero_()
            self._save_last()
        # Warnings said during the run, with their state at its end: resolved, or standing.
        for standing, sentence in run_summary(self.state.history):
            log.log(logging.WARNING if standing else logging.INFO,
                    "%s: %s", "still at the end" if standing else "resolved", sentence)  # fmt: skip
        result = self.summary()
        verdict = RankingVerdict.from_sidecar({"ranking": result["ranking"]})
        if verdict is not None:
            log.log(logging.INFO if verdict.ranks else logging.WARNING, "%s",
                    verdict.describe() if verdict.ranks else verdict.warning())  # fmt: skip
        return result

    def _calibrate_batchnorm(self) -> None:
        """``train.bn_calibration_patients`` > 0 with a random backbone: estimate its
        BatchNorm statistics from that many training patients (see ``batchnorm_stats.py``).

        The patients are a seeded draw of the training split, read whole and un-augmented,
        so the calibration consumes nothing from the RNG streams a resume restores. Every rank
        sees the same patients and gets the same statistics.
        """
        n = self.cfg.train.bn_calibration_patients
        if n == 0:
            return
        if self.cfg.model.pretrained.lower() != "none":
            log.info("bn_calibration_patients ignored: the backbone is pretrained")
            return
        ids = self.splits["train"]
        order = np.random.default_rng(self.cfg.seed).permutation(len(ids))[:n]
        chosen = PatientDataset(self.cache, [ids[i] for i in sorted(order)], train=False)
        loader = self.loader(chosen, batch_size=self.cfg.train.batch_patients)
        start = time.perf_counter()
        bar = tqdm(
            loader,
            desc="BatchNorm statistics",
            leave=False,
            disable=not (self.dist.is_main and self.progress),
            dynamic_ncols=True,
        )
        slices = calibrate_batchnorm(
            self.model, bar, lambda b: self._inputs(b, train=False), self.device
        )
        log.info(
            "BatchNorm statistics of the random backbone calibrated on %d slices of %d "
            "training patients (%.1f s)", slices, len(chosen), time.perf_counter() - start,
        )  # fmt: skip

    def _epochs(self) -> Iterator[int]:
        yield from range(self.state.epoch, self.cfg.train.epochs)

    def summary(self) -> dict[str, Any]:
        history = self.state.history
        best = next((r for r in history if r["epoch"] == self.state.best_epoch), None)
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.state.best_epoch,
            "best": best,
            "final": history[-1] if history else None,
            "skipped_steps": self.state.skipped_steps,
            "run_dir": str(self.run_dir),
            "ranking": self._ranking(),
        }

    def _ranking(self) -> dict[str, Any] | None:
        """The selected weights' ranking verdict, as model.json records it (said at the end)."""
        path = self.run_dir / rundir.MODEL_SIDECAR
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get("ranking")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.folder.close()
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or with ``resume=True`` continue) a run in ``run_dir``; returns the best and
    final epoch's metrics. ``progress=False``: no progress bars (the log still says each epoch).

    ``stop_after_steps`` is a test hook: the run stops abruptly after that many optimiser
    steps (raising :class:`TrainingInterrupted`), saving nothing more, as a kill would.
    """
    trainer = Trainer(
        cfg, Path(run_dir), resume=resume, stop_after_steps=stop_after_steps, progress=progress
    )
    try:
        return trainer.fit()
    finally:
        trainer.close()
