"""The durable record of a serve node: an SQLite database in the store folder.

One row per study result: ``received`` while instances arrive, ``processing`` while it is
scored, ``done`` (results written) or ``failed`` (the reason in ``error``), and ``sent`` once
PACS acknowledged every result object. Instances that arrive after a study was taken for
scoring open a new row for the same study (its next ``revision``), since its result no longer
covers everything received. The spool on disk is the truth about instances: the record is
rebuilt from it for anything a crash kept out of the database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DATABASE = "serve.sqlite"

STATES = ("received", "processing", "done", "failed", "sent")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'done', 'failed', 'sent')),
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    probability REAL,
    decision INTEGER,
    threshold REAL,
    model TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '[]',
    processed_at REAL,
    sent_at REAL,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_send REAL NOT NULL DEFAULT 0,
    send_error TEXT NOT NULL DEFAULT '',
    UNIQUE (study_uid, revision)
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received REAL NOT NULL,
    study_row INTEGER NOT NULL REFERENCES studies (id)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
"""

STATUS_COLUMNS = [
    "id", "study_uid", "revision", "state", "instances", "patient_id", "series_uid",
    "probability", "decision", "threshold", "model", "error", "last_received", "processed_at",
    "sent_at", "send_attempts", "send_error",
]  # fmt: skip


@dataclass(frozen=True)
class Study:
    """One row of the record."""

    id: int
    study_uid: str
    revision: int
    state: str
    instances: int
    last_received: float
    results: list[str]
    send_attempts: int


def _study(row: sqlite3.Row) -> Study:
    return Study(
        id=row["id"],
        study_uid=row["study_uid"],
        revision=row["revision"],
        state=row["state"],
        instances=row["instances"],
        last_received=row["last_received"],
        results=json.loads(row["results"]),
        send_attempts=row["send_attempts"],
    )


class Record:
    """The record, shared by the reception threads, the worker and the forwarder.

    One connection behind a lock: every change is one short transaction, so contention is
    negligible beside the fsync of each received instance."""

    def __init__(self, store: str | Path, *, clock=time.time):
        self.path = Path(store) / DATABASE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL: readers (``--status``) never block reception. NORMAL synchronisation may lose
        # the last commits on power loss, never on a process crash; what it loses the spool
        # still holds, and ``register_spooled`` restores it at the next start.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ----------------------------------------------------------------------- reception

    def receive(self, study_uid: str, sop_uid: str, path: str, now: float | None = None) -> int:
        """Record one instance already safe in the spool; returns its study row's id.

        An instance received again (a sender retrying after a lost acknowledgement) changes
        nothing that was scored; a new instance of a study taken for scoring opens the
        study's next revision."""
        now = self._clock() if now is None else now
        with self._transaction() as db:
            known = db.execute(
                "SELECT study_row FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            # A study refused so far (only other modalities arrived) is opened again by its
            # first head CT instance.
            open_row = db.execute(
                "SELECT id FROM studies WHERE study_uid = ? AND (state = 'received' OR "
                "(state = 'failed' AND instances = 0)) ORDER BY revision DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
            if known is not None and open_row is None:
                return int(known["study_row"])
            if open_row is None:
                revision = db.execute(
                    "SELECT COALESCE(MAX(revision) + 1, 0) FROM studies WHERE study_uid = ?",
                    (study_uid,),
                ).fetchone()[0]
                row_id = db.execute(
                    "INSERT INTO studies (study_uid, revision, state, first_received, "
                    "last_received) VALUES (?, ?, 'received', ?, ?)",
                    (study_uid, revision, now, now),
                ).lastrowid
            else:
                row_id = int(open_row["id"])
            db.execute(
                "INSERT INTO instances (sop_uid, study_uid, path, received, study_row) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sop_uid) DO UPDATE SET "
                "received = excluded.received, study_row = excluded.study_row",
                (sop_uid, study_uid, path, now, row_id),
            )
            db.execute(
                "UPDATE studies SET state = 'received', error = '', last_received = ?, "
                "instances = (SELECT COUNT(*) FROM instances WHERE study_uid = ?) WHERE id = ?",
                (now, study_uid, row_id),
            )
            return row_id

    def refuse(self, study_uid: str, reason: str) -> None:
        """A refused instance of a study nothing was accepted from: the study gets a failed
        row saying why, so that it does not vanish from the record."""
        now = self._clock()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone():
                return
            db.execute(
                "INSERT INTO studies (study_uid, revision, state, first_received, "
                "last_received, error, processed_at) VALUES (?, 0, 'failed', ?, ?, ?, ?)",
                (study_uid, now, now, reason, now),
            )

    def known_instances(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT sop_uid FROM instances")}

    # ----------------------------------------------------------------------- processing

    def recover(self) -> int:
        """After a crash: studies left ``processing`` are scored again (their results were
        not recorded; the objects get the same UIDs, so PACS sees no duplicates)."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE studies SET state = 'received' WHERE state = 'processing'"
            ).rowcount

    def claim_stable(self, stable_seconds: float) -> Study | None:
        """Take the study that has been quiet longest for scoring, if one has been quiet for
        ``stable_seconds``: ``received`` -> ``processing`` in one transaction, so that no
        study is claimed twice and none while an instance is being recorded."""
        cutoff = self._clock() - stable_seconds
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE state = 'received' AND last_received <= ? "
                "ORDER BY last_received LIMIT 1",
                (cutoff,),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE studies SET state = 'processing' WHERE id = ?", (row["id"],))
            return _study(row)

    def finish(
        self,
        study_id: int,
        *,
        error: str = "",
        results: list[str] | None = None,
        **fields,
    ) -> None:
        """Record a study's outcome: ``done`` with its result files, or ``failed`` with why."""
        state = "failed" if error else "done"
        values = {
            **fields,
            "state": state,
            "error": error,
            "results": json.dumps(results or []),
            "processed_at": self._clock(),
        }
        assignments = ", ".join(f"{key} = ?" for key in values)
        with self._transaction() as db:
            db.execute(
                f"UPDATE studies SET {assignments} WHERE id = ? AND state = 'processing'",
                (*values.values(), study_id),
            )

    # ----------------------------------------------------------------------- forwarding

    def due_for_sending(self) -> list[Study]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM studies WHERE state = 'done' AND results != '[]' "
                "AND next_send <= ? ORDER BY processed_at",
                (self._clock(),),
            ).fetchall()
        return [_study(r) for r in rows]

    def sent(self, study_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = 'sent', sent_at = ?, send_error = '' "
                "WHERE id = ? AND state = 'done'",
                (self._clock(), study_id),
            )

    def send_failed(self, study_id: int, reason: str, retry_in: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET send_attempts = send_attempts + 1, send_error = ?, "
                "next_send = ? WHERE id = ?",
                (reason, self._clock() + retry_in, study_id),
            )

    # ----------------------------------------------------------------------- reading

    def table(self) -> pd.DataFrame:
        with self._lock:
            frame = pd.read_sql_query("SELECT * FROM studies ORDER BY id", self._db)
        return frame[STATUS_COLUMNS]


def read_status(store: str | Path) -> pd.DataFrame:
    """The record's studies, read-only (a running node keeps writing meanwhile)."""
    path = Path(store) / DATABASE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no serve record here (is {store} a --store folder?)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return pd.read_sql_query("SELECT * FROM studies ORDER BY id", db)[STATUS_COLUMNS]
    finally:
        db.close()


def format_status(table: pd.DataFrame) -> str:
    """The record as a console table: times in UTC, long UIDs and errors shortened."""
    if table.empty:
        return "no studies received yet"
    shown = table.copy()
    for column in ("last_received", "processed_at", "sent_at"):
        shown[column] = pd.to_datetime(shown[column], unit="s", utc=True).dt.strftime(
            "%Y-%m-%d %H:%M:%S"
        )
    shown["study_uid"] = shown["study_uid"].map(lambda u: u if len(u) <= 24 else "…" + u[-23:])
    shown["probability"] = shown["probability"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}")
    shown["threshold"] = shown["threshold"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}")
    shown["decision"] = shown["decision"].map(lambda d: "" if pd.isna(d) else str(int(d)))
    shown = shown.drop(columns=["series_uid"]).fillna("")
    for column in ("error", "send_error"):
        shown[column] = shown[column].map(lambda e: e if len(e) <= 60 else e[:59] + "…")
    return shown.to_string(index=False)
