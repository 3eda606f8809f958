"""The serve node: reception, the stability watcher with its scoring worker, and forwarding,
each in its own thread around one record.

A study is scored when no instance of it arrived for ``stable_seconds`` (Orthanc's
``StableAge`` rule); scoring runs in one worker thread, forwarding in another, so that neither
a slow model nor a PACS that is down holds up reception.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainmets.backends import BackendSpec, load_backend
from brainmets.inference import TrainedModel
from brainmets.predict import predict_study
from brainmets.serve import DEFAULT_STABLE_SECONDS
from brainmets.serve.forward import Destination, SendError, backoff, send_files
from brainmets.serve.record import Record, Study
from brainmets.serve.scp import Spool, StorageSCP, register_spooled

log = logging.getLogger(__name__)

RESULTS = "results"


@dataclass
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "BRAINMETS"
    allow: Sequence[str] = ()
    stable_seconds: float = DEFAULT_STABLE_SECONDS
    forward: Destination | None = None
    top_k: int = 3
    poll_seconds: float = 0.5
    # Scoring backend, as predict's --backend; Grad-CAM captures stay in PyTorch.
    backend: BackendSpec = field(default_factory=BackendSpec)


def _short(uid: str) -> str:
    """A study UID's tail: enough to find its row, short enough for a log line."""
    return uid if len(uid) <= 16 else "…" + uid[-15:]


class Node:
    """A running serve node. ``start()`` listens and returns the port; ``stop()`` ends it."""

    def __init__(self, run: str | Path, store: str | Path, config: NodeConfig):
        self.run = Path(run)
        self.store = Path(store)
        self.config = config
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.trained: TrainedModel | None = None
        self.record: Record | None = None
        self.scp: StorageSCP | None = None
        self.port: int | None = None

    def start(self) -> int:
        cfg = self.config
        # The model first: a run that cannot load must fail before anything is acknowledged.
        self.trained = load_backend(self.run, cfg.backend, grad_cam=cfg.top_k > 0)
        self.store.mkdir(parents=True, exist_ok=True)
        self.record = Record(self.store)
        spool = Spool(self.store)
        recovered = self.record.recover()
        registered = register_spooled(spool, self.record)
        if recovered or registered:
            log.info(
                "restart: %d studies to score again, %d spooled instances recorded",
                recovered,
                registered,
            )
        self.scp = StorageSCP(spool, self.record, ae_title=cfg.ae_title, allow=cfg.allow)
        self.port = self.scp.start(cfg.host, cfg.port)
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

    def wait(self) -> None:
        """Block until ``stop()`` (or SIGTERM/SIGINT when run from the command line)."""
        while not self._stop.wait(1.0):
            pass

    # ----------------------------------------------------------------------- scoring

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            study = self.record.claim_stable(self.config.stable_seconds)
            if study is None:
                self._stop.wait(self.config.poll_seconds)
                continue
            self.score(study)

    def score(self, study: Study) -> None:
        """Score one claimed study and record its outcome; never raises (the node goes on)."""
        trained = self.trained
        start = time.monotonic()
        folder = self.scp.spool.study_dir(study.study_uid)
        name = f"study {_short(study.study_uid)} (revision {study.revision})"
        try:
            predictions, errors = predict_study(trained, folder)
            if not predictions:
                reasons = "; ".join(e["error"] for e in errors) or "no patient found"
                raise _NoResult(reasons)
            from brainmets.dicom_results import write_dicom_results

            out = self.store / RESULTS / study.study_uid / f"r{study.revision}"
            results = []
            for prediction in predictions:
                written = write_dicom_results(
                    trained,
                    prediction.item,
                    prediction.score,
                    out,
                    top_k=self.config.top_k,
                    revision=study.revision,
                )
                results += [str(p) for p in written.files]
        except _NoResult as err:
            log.warning("%s: no result: %s", name, err)
            self.record.finish(study.id, error=str(err), model=trained.model_id)
            return
        except Exception as err:  # noqa: BLE001 - one bad study must not stop the node
            log.exception("%s failed", name)
            self.record.finish(study.id, error=f"{type(err).__name__}: {err}")
            return
        row = predictions[0].row
        self.record.finish(
            study.id,
            results=results,
            patient_id=row["patient_id"],
            series_uid=row["series_uid"],
            probability=row["probability"],
            decision=row["decision"],
            threshold=row["threshold"],
            model=row["model"],
        )
        log.info(
            "%s: patient %s p=%.3f decision %d, %d result objects (%.1f s)",
            name,
            row["patient_id"],
            row["probability"],
            row["decision"],
            len(results),
            time.monotonic() - start,
        )

    # ----------------------------------------------------------------------- forwarding

    def _forward_loop(self) -> None:
        destination = self.config.forward
        while not self._stop.is_set():
            for study in self.record.due_for_sending():
                if self._stop.is_set():
                    return
                try:
                    send_files(destination, study.results, calling_ae=self.config.ae_title)
                except (SendError, OSError, ValueError) as err:
                    delay = backoff(study.send_attempts + 1)
                    self.record.send_failed(study.id, str(err), delay)
                    log.warning(
                        "study %s: not sent to %s (%s); next try in %gs",
                        _short(study.study_uid),
                        destination,
                        err,
                        delay,
                    )
                    continue
                self.record.sent(study.id)
                log.info("study %s: results sent to %s", _short(study.study_uid), destination)
            self._stop.wait(self.config.poll_seconds)


class _NoResult(Exception):
    """A study with nothing to score (no usable series): a failed row, no result objects."""


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
