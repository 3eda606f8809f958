"""The serve node: reception, the scoring worker, and forwarding, each in its own thread
around one record.

A study is scored when no instance of it arrived for ``stable_seconds`` (Orthanc's
``StableAge`` rule) and its series looks complete, or has waited ``incomplete_seconds`` for the
rest (then its result is marked partial). Scoring runs in one worker thread, forwarding in
another, so that neither a slow model nor a PACS that is down holds up reception; an error of
the disk or the database stops neither: the study stays queued and the error is said once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainmets.backends import BackendSpec, load_backend
from brainmets.inference import TrainedModel, model_path
from brainmets.io import exclusive_lock, os_error_line
from brainmets.ranking import RankingVerdict
from brainmets.serve import (
    DEFAULT_INCOMPLETE_SECONDS,
    DEFAULT_KEEP_DAYS,
    DEFAULT_STABLE_SECONDS,
)
from brainmets.serve.admission import Limits
from brainmets.serve.forward import Destination, backoff, send_files
from brainmets.serve.record import Receipt, Record, Study
from brainmets.serve.scoring import (
    NoResult,
    Scored,
    choose_series,
    incompleteness,
    recorded,
    score,
    scores_json,
    write_results,
)
from brainmets.serve.scp import StorageSCP, short_uid
from brainmets.serve.spool import RESULTS, Spool, apply_retention, register_spooled

log = logging.getLogger(__name__)

LOCK = ".serve.lock"


@dataclass
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "BRAINMETS"
    allow: Sequence[str] = ()
    stable_seconds: float = DEFAULT_STABLE_SECONDS
    incomplete_seconds: float = DEFAULT_INCOMPLETE_SECONDS
    forward: Destination | None = None
    top_k: int = 3
    poll_seconds: float = 0.5
    # Scoring backend, as predict's --backend; Grad-CAM captures stay in PyTorch.
    backend: BackendSpec = field(default_factory=BackendSpec)
    allow_chance: bool = False
    limits: Limits = field(default_factory=Limits)
    keep_days: float = DEFAULT_KEEP_DAYS
    retention_every: float = 60.0


class ModelRefused(ValueError):
    """A model serve will not put beside PACS without being told (``--allow-chance``)."""


def _verdict_line(verdict: RankingVerdict | None) -> str:
    if verdict is None:
        return "no ranking verdict recorded (a run trained before brainmets recorded one)"
    return verdict.describe()


def _recorded_verdict(run: Path) -> tuple[bool, RankingVerdict | None]:
    """(found, verdict) from the run's model.json, read before any backend is loaded."""
    try:
        sidecar = model_path(run).with_suffix(".json")
    except FileNotFoundError:
        return False, None
    if not sidecar.is_file():
        return False, None
    return True, RankingVerdict.from_sidecar(json.loads(sidecar.read_text()))


class _Trouble:
    """An error that repeats while its cause lasts (a full disk): said once, with what
    happens meanwhile, and once more when it is over."""

    def __init__(self, what: str, meanwhile: str):
        self.what = what
        self.meanwhile = meanwhile
        self.failures = 0

    def failed(self, err: BaseException, record: Path) -> None:
        self.failures += 1
        if self.failures > 1:
            return
        if isinstance(err, OSError):
            log.error("%s: %s; %s", self.what, os_error_line(err), self.meanwhile)
        elif isinstance(err, sqlite3.Error):
            log.error("%s: %s: %s; %s", self.what, record, err, self.meanwhile)
        else:  # a fault of ours: its traceback, once
            log.exception("%s: unexpected %s; %s", self.what, type(err).__name__, self.meanwhile)

    def ok(self) -> None:
        if self.failures:
            log.info("%s: working again after %d failed attempts", self.what, self.failures)
            self.failures = 0


class Node:
    """A running serve node. ``start()`` listens and returns the port; ``stop()`` ends it."""

    def __init__(self, run: str | Path, store: str | Path, config: NodeConfig):
        self.run = Path(run)
        self.store = Path(store)
        self.config = config
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held = contextlib.ExitStack()
        self.trained: TrainedModel | None = None
        self.verdict: RankingVerdict | None = None
        self.limitations: list[str] = []
        self.record: Record | None = None
        self.scp: StorageSCP | None = None
        self.port: int | None = None

    def start(self) -> int:
        # One node per store, refused before anything is loaded (the second would score and
        # send every study again, and share the spool with the first).
        self._held.enter_context(exclusive_lock(self.store / LOCK, f"serve store {self.store}"))
        try:
            return self._start()
        except BaseException:
            self.stop()  # whatever was started, and the lock
            raise

    def _start(self) -> int:
        cfg = self.config
        found, self.verdict = _recorded_verdict(self.run)
        if found:  # said before a backend loads (and onnxruntime prints its own lines)
            self._judge(self.verdict)
        # The model first: a run that cannot load must fail before anything is acknowledged.
        self.trained = load_backend(self.run, cfg.backend, grad_cam=cfg.top_k > 0)
        if not found:
            self.verdict = RankingVerdict.from_sidecar(self.trained.sidecar)
            self._judge(self.verdict)
        self._open_record()
        self._spawn("brainmets-score", self._score_loop)
        if cfg.forward is not None:
            self._spawn("brainmets-forward", self._forward_loop)
        log.info(
            "serve: %s listening on %s:%d (model %s on %s, stable after %gs%s)",
            cfg.ae_title,
            cfg.host,
            self.port,
            self.trained.model_id,
            cfg.backend,
            cfg.stable_seconds,
            f", forwarding to {cfg.forward}" if cfg.forward else "",
        )
        return self.port

    def _judge(self, verdict: RankingVerdict | None) -> None:
        """Only a model shown to rank its validation patients is served unless told."""
        if verdict is not None and verdict.ranks:
            return
        what = _verdict_line(verdict)
        if not self.config.allow_chance:
            raise ModelRefused(
                f"{self.run}: {what}. serve puts only a model that ranks beside PACS; add "
                "--allow-chance to serve it anyway (each SR then states this limitation)"
            )
        log.warning("serving with --allow-chance: %s; each SR states this limitation", what)
        self.limitations = [
            f"The model is not shown to rank patients better than chance ({what}); "
            "it is served only because --allow-chance was given."
        ]

    def _open_record(self) -> None:
        cfg = self.config
        self.record = Record(self.store)
        spool = Spool(self.store)
        recovered = self.record.recover(cfg.stable_seconds)
        registered = register_spooled(spool, self.record)
        if recovered or registered:
            log.info(
                "restart: %d studies to score again, %d to write again, %d to send again, "
                "%d spooled instances recorded",
                recovered.rescore, recovered.rewrite, recovered.resend, registered,
            )  # fmt: skip
        verdict = self.verdict
        self.record.describe_node(
            model=self.trained.model_id,
            backend=cfg.backend,
            verdict=verdict.verdict if verdict is not None else "not recorded",
            ranking=_verdict_line(verdict),
            allow_chance="yes" if self.limitations else "no",
            started=time.time(),
        )
        self.scp = StorageSCP(
            spool,
            self.record,
            ae_title=cfg.ae_title,
            allow=cfg.allow,
            limits=cfg.limits,
            on_received=self._arrived,
        )
        self.port = self.scp.start(cfg.host, cfg.port)

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        for thread in self._threads:
            # A study being scored is left ``processing``: the next start scores it again.
            thread.join(timeout)
        if self.record is not None:
            self.record.close()
        self._held.close()

    def wait(self) -> None:
        """Block until ``stop()`` (or SIGTERM/SIGINT when run from the command line)."""
        while not self._stop.wait(1.0):
            pass

    def _arrived(self, study_uid: str, receipt: Receipt, calling_ae: str) -> None:
        if receipt.opened:
            log.info(
                "study %s: receiving from AE %r (revision %d)",
                short_uid(study_uid), calling_ae, receipt.revision,
            )  # fmt: skip

    # ----------------------------------------------------------------------- scoring

    def _score_loop(self) -> None:
        cfg = self.config
        trouble = _Trouble("scoring", "the study stays queued and is tried again")
        stranded = False
        swept = float("-inf")
        while not self._stop.is_set():
            try:
                if stranded:
                    self.record.release_stranded()
                    stranded = False
                study = self.record.claim_next(cfg.stable_seconds)
                if study is None:
                    if time.monotonic() - swept >= cfg.retention_every:
                        swept = time.monotonic()
                        apply_retention(self.scp.spool, self.record, cfg.keep_days * 86400.0,
                                        forwarding=cfg.forward is not None, now=time.time())  # fmt: skip
                    self._stop.wait(cfg.poll_seconds)
                    continue
                stranded = True  # until its outcome is recorded
                self.process(study)
                stranded = False
                trouble.ok()
            except Exception as err:  # noqa: BLE001 - the worker outlives any one failure
                trouble.failed(err, self.record.path)
                self._stop.wait(max(cfg.poll_seconds, 1.0))

    def process(self, study: Study) -> None:
        """Score a claimed study, or write the results of a scored one, and record the
        outcome. Errors of one study are its row's; only database errors propagate."""
        name = f"study {short_uid(study.study_uid)} (revision {study.revision})"
        if study.scores and study.model == self.trained.model_id:
            self._write(study, name, None)
            return
        if study.scores:
            log.info("%s: scored by model %s, scored again by %s", name, study.model,
                     self.trained.model_id)  # fmt: skip
        self._score(study, name)

    def _score(self, study: Study, name: str) -> None:
        cfg, trained = self.config, self.trained
        start = time.monotonic()
        folder = self.scp.spool.study_dir(study.study_uid)
        try:
            jobs = choose_series(trained, folder)
            partial = incompleteness(jobs)
            until = study.last_received + cfg.incomplete_seconds
            if partial and time.time() < until:
                if self.record.hold(study.id, until, partial):
                    log.info("%s: %d instances, looks incomplete (%s); waiting up to %.0f s for "
                             "the rest", name, study.instances, partial, until - time.time())  # fmt: skip
                else:
                    log.info("%s: superseded by a newer revision (more instances came)", name)
                return
            if partial:
                log.warning("%s: still incomplete after %g s (%s): scored, and its result marked "
                            "partial", name, cfg.incomplete_seconds, partial)  # fmt: skip
            log.info("%s: %d instances, scoring", name, study.instances)
            scored = score(trained, jobs)
        except sqlite3.Error:
            raise
        except NoResult as err:
            log.warning("%s: no result: %s", name, err)
            self.record.finish(study.id, error=str(err), model=trained.model_id)
            return
        except Exception as err:  # noqa: BLE001 - one bad study must not stop the node
            log.exception("%s failed", name)
            self.record.finish(study.id, error=f"{type(err).__name__}: {err}")
            return
        row = scored[0].row
        self.record.record_score(
            study.id,
            patient_id=row["patient_id"],
            series_uid=row["series_uid"],
            probability=row["probability"],
            decision=row["decision"],
            threshold=row["threshold"],
            model=row["model"],
            scores=scores_json(scored),
            partial=partial,
        )
        log.info(
            "%s: patient %s p=%.3f decision %d%s (%.1f s)",
            name, row["patient_id"], row["probability"], row["decision"],
            ", partial" if partial else "", time.monotonic() - start,
        )  # fmt: skip
        self._write(study, name, scored, partial)

    def _write(
        self, study: Study, name: str, scored: list[Scored] | None, partial: str | None = None
    ) -> None:
        """Write the result objects of a scored study (from its recorded score when
        ``scored`` is None); a failure keeps the score and is tried again later."""
        cfg, trained = self.config, self.trained
        partial = study.partial if partial is None else partial
        try:
            if scored is None:
                scored = recorded(trained, self.scp.spool.study_dir(study.study_uid), study.scores)
            files = write_results(
                trained,
                scored,
                self.store / RESULTS / study.study_uid / f"r{study.revision}",
                top_k=cfg.top_k,
                revision=study.revision,
                partial=partial,
                previous=self.record.previous_results(study.study_uid, study.revision),
                limitations=self.limitations,
            )
        except sqlite3.Error:
            raise
        except Exception as err:  # noqa: BLE001 - the score stays recorded whatever failed
            reason = (
                os_error_line(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
            )
            again = self.record.write_failed(study.id, reason, backoff(study.write_attempts + 1))
            log.error("%s: results not written: %s; the score is kept%s", name, reason,
                      ", written again later" if again else "")  # fmt: skip
            return
        self.record.written(study.id, files)
        log.info("%s: %d result objects written", name, len(files))

    # ----------------------------------------------------------------------- forwarding

    def _forward_loop(self) -> None:
        trouble = _Trouble("forwarding", "results stay queued and are sent later")
        while not self._stop.is_set():
            try:
                self._forward_due()
                trouble.ok()
            except Exception as err:  # noqa: BLE001 - the forwarder outlives any one failure
                trouble.failed(err, self.record.path)
            self._stop.wait(self.config.poll_seconds)

    def _forward_due(self) -> None:
        destination = self.config.forward
        for study in self.record.due_for_sending():
            if self._stop.is_set():
                return
            try:
                send_files(destination, study.results, calling_ae=self.config.ae_title)
            except sqlite3.Error:
                raise
            except Exception as err:  # noqa: BLE001 - a PACS down, a result file gone
                delay = backoff(study.send_attempts + 1)
                again = self.record.send_failed(study.id, str(err), delay)
                log.warning(
                    "study %s: not sent to %s (%s); %s",
                    short_uid(study.study_uid), destination, err,
                    f"next try in {delay:g}s" if again else "given up until the next start",
                )  # fmt: skip
                continue
            self.record.sent(study.id)
            log.info("study %s: results sent to %s", short_uid(study.study_uid), destination)


def serve_forever(run: str | Path, store: str | Path, config: NodeConfig) -> int:
    """``brainmets serve``: run the node until SIGTERM or Ctrl-C."""
    node = Node(run, store, config)
    node.start()
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    try:
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("serve: stopping")
        node.stop()
    return 0
