"""The durable record of a serve node: an SQLite database in the store folder.

One row per study result, in one of these states:

- ``received``: instances arrive; a study that looks incomplete waits here (``hold_until``,
  the reason in ``partial``) for the rest of its slices;
- ``processing``: taken by the worker, to be scored, or to have its results written;
- ``scored``: the score is recorded (probability, decision, the slice logits in ``scores``)
  but its result objects could not be written yet: written again later, a bounded number of
  times, and again at each start; the score itself is not computed again unless the model
  changed;
- ``done``: results written; ``sent`` once PACS acknowledged every one of them;
- ``failed``: nothing to score (``error`` says why), or results that could not be written
  (then the score is kept beside the reason).

Instances that arrive after a study was taken for scoring open a new row for the same study
(its next ``revision``), since its result no longer covers everything received; so does an
instance re-sent with other content under a SOP instance UID already held. The spool on disk
is the truth about instances: the record is rebuilt from it for anything a crash kept out of
the database.
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
SCHEMA_VERSION = 2

STATES = ("received", "processing", "scored", "done", "failed", "sent")
WAITING = ("received", "processing", "scored")

MAX_WRITE_ATTEMPTS = 8
"""Writing results, per round: with the back-off (5 s doubling to 5 min) about 10 minutes."""
MAX_SEND_ATTEMPTS = 300
"""Sending results, per round: with the back-off capped at 5 min about a day, long enough for a
PACS down overnight. A restart starts a new round for what was given up."""

_STUDIES = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({states})),
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    hold_until REAL NOT NULL DEFAULT 0,
    patient_id TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    probability REAL,
    decision INTEGER,
    threshold REAL,
    model TEXT NOT NULL DEFAULT '',
    scores TEXT NOT NULL DEFAULT '',
    partial TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '[]',
    processed_at REAL,
    write_attempts INTEGER NOT NULL DEFAULT 0,
    write_budget INTEGER NOT NULL DEFAULT {max_write},
    next_write REAL NOT NULL DEFAULT 0,
    sent_at REAL,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    send_budget INTEGER NOT NULL DEFAULT {max_send},
    next_send REAL NOT NULL DEFAULT 0,
    send_error TEXT NOT NULL DEFAULT '',
    pruned_at REAL,
    UNIQUE (study_uid, revision)
)
"""

_OTHERS = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    received REAL NOT NULL,
    study_row INTEGER NOT NULL REFERENCES studies (id)
);
CREATE TABLE IF NOT EXISTS node (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state);
CREATE INDEX IF NOT EXISTS studies_uid ON studies (study_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
"""

# The columns of a version-1 record (before ``scored``), carried over when it is upgraded.
_V1_COLUMNS = (
    "id, study_uid, revision, state, instances, first_received, last_received, patient_id, "
    "series_uid, probability, decision, threshold, model, error, results, processed_at, "
    "sent_at, send_attempts, next_send, send_error"
)

STATUS_COLUMNS = [
    "id", "study_uid", "revision", "state", "instances", "patient_id", "series_uid",
    "probability", "decision", "threshold", "model", "partial", "error", "last_received",
    "processed_at", "write_attempts", "sent_at", "send_attempts", "send_error", "pruned_at",
]  # fmt: skip


def _studies_sql(name: str = "studies") -> str:
    states = ", ".join(f"'{s}'" for s in STATES)
    return _STUDIES.format(
        name=name, states=states, max_write=MAX_WRITE_ATTEMPTS, max_send=MAX_SEND_ATTEMPTS
    )


@dataclass(frozen=True)
class Study:
    """One row of the record, as the worker and the forwarder need it."""

    id: int
    study_uid: str
    revision: int
    state: str
    instances: int
    last_received: float
    results: list[str]
    send_attempts: int
    patient_id: str = ""
    model: str = ""
    scores: str = ""
    partial: str = ""
    write_attempts: int = 0


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
        patient_id=row["patient_id"],
        model=row["model"],
        scores=row["scores"],
        partial=row["partial"],
        write_attempts=row["write_attempts"],
    )


@dataclass(frozen=True)
class Receipt:
    """What recording one instance did."""

    row: int
    revision: int
    opened: bool
    """The instance opened its row: the study's first, or its next revision."""
    changed: bool
    """A SOP instance UID already held, sent again with other content."""


@dataclass(frozen=True)
class Recovered:
    """What a start found left over from the last run."""

    rescore: int
    rewrite: int
    resend: int

    def __bool__(self) -> bool:
        return bool(self.rescore or self.rewrite or self.resend)


class Record:
    """The record, shared by the reception threads, the worker and the forwarder.

    One connection behind a lock: every change is one short transaction, so contention is
    negligible beside the fsync of each received instance. Every method may raise
    :class:`sqlite3.Error` (a full disk): callers keep their study retryable."""

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
        self._upgrade()

    def _upgrade(self) -> None:
        """Create the schema, or bring a record written by an earlier version up to it (the
        table is rebuilt, since SQLite cannot change a CHECK constraint in place)."""
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            old = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'"
            ).fetchone()
            if old is not None and version < 2:
                db.execute(_studies_sql("studies_v2"))
                db.execute(
                    f"INSERT INTO studies_v2 ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM studies"
                )
                db.execute("DROP TABLE studies")
                db.execute("ALTER TABLE studies_v2 RENAME TO studies")
                columns = {r["name"] for r in db.execute("PRAGMA table_info(instances)")}
                if "sha256" not in columns:
                    db.execute("ALTER TABLE instances ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
            db.execute(_studies_sql())
            for statement in filter(str.strip, _OTHERS.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    def receive(
        self,
        study_uid: str,
        sop_uid: str,
        path: str,
        now: float | None = None,
        *,
        digest: str = "",
        patient_id: str = "",
    ) -> Receipt:
        """Record one instance already safe in the spool.

        An instance received again with the same content (a sender retrying after a lost
        acknowledgement) changes nothing that was scored; a new instance of a study taken
        for scoring, or a known one with other content (``digest`` differs), opens the
        study's next revision."""
        now = self._clock() if now is None else now
        with self._transaction() as db:
            known = db.execute(
                "SELECT study_row, sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            changed = bool(known and digest and known["sha256"] and known["sha256"] != digest)
            # A study refused so far (only other modalities arrived) is opened again by its
            # first head CT instance.
            open_row = db.execute(
                "SELECT id, revision FROM studies WHERE study_uid = ? AND (state = 'received' OR "
                "(state = 'failed' AND instances = 0)) ORDER BY revision DESC LIMIT 1",
                (study_uid,),
            ).fetchone()
            if known is not None and not changed and open_row is None:
                revision = db.execute(
                    "SELECT revision FROM studies WHERE id = ?", (known["study_row"],)
                ).fetchone()
                return Receipt(int(known["study_row"]), int(revision[0]), False, False)
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
                opened = True
            else:
                row_id, revision = int(open_row["id"]), int(open_row["revision"])
                opened = False
            db.execute(
                "INSERT INTO instances (sop_uid, study_uid, path, sha256, received, study_row) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sop_uid) DO UPDATE SET "
                "path = excluded.path, sha256 = excluded.sha256, received = excluded.received, "
                "study_row = excluded.study_row",
                (sop_uid, study_uid, path, digest, now, row_id),
            )
            # Every arrival starts the completeness check afresh: the rest may have come.
            db.execute(
                "UPDATE studies SET state = 'received', error = '', last_received = ?, "
                "hold_until = 0, instances = (SELECT COUNT(*) FROM instances WHERE "
                "study_uid = ?), patient_id = CASE WHEN patient_id = '' THEN ? ELSE patient_id "
                "END WHERE id = ?",
                (now, study_uid, patient_id, row_id),
            )
            return Receipt(row_id, revision, opened, changed)

    def held(self, sop_uid: str, digest: str) -> bool:
        """Whether this very instance (same content) is already safe in the spool."""
        with self._lock:
            row = self._db.execute(
                "SELECT path, sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
        return bool(row and row["sha256"] == digest and Path(row["path"]).is_file())

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

    def recover(self, stable_seconds: float = 0.0) -> Recovered:
        """At a start, what the last run left: studies left ``processing`` are scored again
        (or only written, when their score was recorded: the objects get the same UIDs, so
        PACS sees no duplicates); results given up on get a new round of attempts. A study
        still arriving when the node stopped waits ``stable_seconds`` from now, as if an
        instance had just come: its sender is likely to resume."""
        now = self._clock()
        with self._transaction() as db:
            rescore = db.execute(
                "UPDATE studies SET state = 'received' WHERE state = 'processing' AND scores = ''"
            ).rowcount
            rewrite = db.execute(
                "UPDATE studies SET state = 'scored', next_write = 0 WHERE state = 'processing'"
            ).rowcount
            rewrite += db.execute(
                "UPDATE studies SET state = 'scored', next_write = 0, write_budget = ?, "
                "error = '' WHERE state = 'failed' AND scores != '' AND write_attempts > 0",
                (MAX_WRITE_ATTEMPTS,),
            ).rowcount
            resend = db.execute(
                "UPDATE studies SET next_send = 0, send_budget = ? WHERE state = 'done' AND "
                "send_budget <= 0",
                (MAX_SEND_ATTEMPTS,),
            ).rowcount
            db.execute(
                "UPDATE studies SET hold_until = MAX(hold_until, ?) WHERE state = 'received'",
                (now + stable_seconds,),
            )
        return Recovered(rescore, rewrite, resend)

    def claim_next(self, stable_seconds: float) -> Study | None:
        """Take the next piece of work, moving its row to ``processing`` in one transaction
        (no study is claimed twice, none while an instance is being recorded): a scored study
        whose results are due to be written again, else the study quiet longest, once no
        instance came for ``stable_seconds`` and it is not waiting for missing slices."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE state = 'scored' AND next_write <= ? "
                "ORDER BY next_write LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT * FROM studies WHERE state = 'received' AND last_received <= ? "
                    "AND hold_until <= ? ORDER BY last_received LIMIT 1",
                    (now - stable_seconds, now),
                ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE studies SET state = 'processing' WHERE id = ?", (row["id"],))
            return _study(row)

    def hold(self, study_id: int, until: float, reason: str) -> bool:
        """Put a claimed study back to wait until ``until`` for the slices ``reason`` says
        are missing. Returns False when a newer revision opened meanwhile (more instances
        came while it was checked): this row is then superseded, a failed row saying so."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT study_uid, revision FROM studies WHERE id = ?", (study_id,)
            ).fetchone()
            newer = db.execute(
                "SELECT MAX(revision) FROM studies WHERE study_uid = ? AND revision > ?",
                (row["study_uid"], row["revision"]),
            ).fetchone()[0]
            if newer is not None:
                db.execute(
                    "UPDATE studies SET state = 'failed', partial = ?, processed_at = ?, "
                    "error = ? WHERE id = ? AND state = 'processing'",
                    (reason, self._clock(), f"superseded by revision {newer}", study_id),
                )
                return False
            db.execute(
                "UPDATE studies SET state = 'received', hold_until = ?, partial = ? "
                "WHERE id = ? AND state = 'processing'",
                (until, reason, study_id),
            )
            return True

    def record_score(self, study_id: int, **fields) -> None:
        """The score of a claimed study, recorded before its results are written, so that
        nothing that fails later loses it (``scores``: JSON of the slice logits)."""
        self._update(study_id, "processing", {**fields, "processed_at": self._clock()})

    def written(self, study_id: int, results: list[str]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = 'done', results = ?, error = '', "
                "write_attempts = write_attempts + 1 WHERE id = ? AND state = 'processing'",
                (json.dumps(results), study_id),
            )

    def write_failed(self, study_id: int, reason: str, retry_in: float) -> bool:
        """Writing a scored study's results failed: ``scored`` with the reason, tried again
        after ``retry_in`` seconds; ``failed`` (the score kept) once the attempts of this
        round are spent. Returns True while it will be tried again."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT write_attempts, write_budget FROM studies WHERE id = ?", (study_id,)
            ).fetchone()
            attempts, budget = row["write_attempts"] + 1, row["write_budget"] - 1
            again = budget > 0
            error = f"results not written: {reason}"
            if not again:
                error += f" (gave up after {attempts} attempts; the score is kept; a restart tries again)"
            db.execute(
                "UPDATE studies SET state = ?, error = ?, write_attempts = ?, write_budget = ?, "
                "next_write = ? WHERE id = ? AND state = 'processing'",
                ("scored" if again else "failed", error, attempts, budget,
                 self._clock() + retry_in, study_id),
            )  # fmt: skip
        return again

    def finish(
        self,
        study_id: int,
        *,
        error: str = "",
        results: list[str] | None = None,
        **fields,
    ) -> None:
        """Record a study's outcome in one step: ``done`` with its result files, or
        ``failed`` with why (a study with nothing to score)."""
        state = "failed" if error else "done"
        values = {
            **fields,
            "state": state,
            "error": error,
            "results": json.dumps(results or []),
            "processed_at": self._clock(),
        }
        self._update(study_id, "processing", values)

    def _update(self, study_id: int, state: str, values: dict) -> None:
        assignments = ", ".join(f"{key} = ?" for key in values)
        with self._transaction() as db:
            db.execute(
                f"UPDATE studies SET {assignments} WHERE id = ? AND state = ?",
                (*values.values(), study_id, state),
            )

    def release_stranded(self) -> int:
        """Rows left ``processing`` by a worker that could not record their outcome (the
        database was full): back in the queue. Only the one worker claims, and it calls this
        between studies, so no row it is working on is touched."""
        with self._transaction() as db:
            count = db.execute(
                "UPDATE studies SET state = CASE WHEN scores = '' THEN 'received' ELSE 'scored' "
                "END WHERE state = 'processing'"
            ).rowcount
        return count

    def previous_results(self, study_uid: str, revision: int) -> list[str]:
        """The result files of the study's latest earlier revision that has any."""
        with self._lock:
            row = self._db.execute(
                "SELECT results FROM studies WHERE study_uid = ? AND revision < ? AND "
                "results != '[]' ORDER BY revision DESC LIMIT 1",
                (study_uid, revision),
            ).fetchone()
        return json.loads(row["results"]) if row else []

    # ----------------------------------------------------------------------- forwarding

    def due_for_sending(self) -> list[Study]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM studies WHERE state = 'done' AND results != '[]' "
                "AND next_send <= ? AND send_budget > 0 ORDER BY processed_at",
                (self._clock(),),
            ).fetchall()
        return [_study(r) for r in rows]

    def sent(self, study_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = 'sent', sent_at = ?, send_error = '', "
                "send_attempts = send_attempts + 1 WHERE id = ? AND state = 'done'",
                (self._clock(), study_id),
            )

    def send_failed(self, study_id: int, reason: str, retry_in: float) -> bool:
        """A failed attempt, tried again after ``retry_in`` seconds while this round's
        attempts last. Returns True while it will be tried again."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT send_attempts, send_budget FROM studies WHERE id = ?", (study_id,)
            ).fetchone()
            attempts, budget = row["send_attempts"] + 1, row["send_budget"] - 1
            if budget <= 0:
                reason += f" (gave up after {attempts} attempts; a restart tries again)"
            db.execute(
                "UPDATE studies SET send_attempts = ?, send_budget = ?, send_error = ?, "
                "next_send = ? WHERE id = ?",
                (attempts, budget, reason, self._clock() + retry_in, study_id),
            )
        return budget > 0

    # ----------------------------------------------------------------------- retention

    def expired(self, cutoff: float, *, forwarding: bool) -> list[str]:
        """Studies whose spool may go: nothing of them waits (every row is ``sent`` or
        ``failed``, or ``done`` when results are not forwarded) and no instance came after
        ``cutoff``."""
        finished = "('sent', 'failed')" if forwarding else "('sent', 'failed', 'done')"
        with self._lock:
            rows = self._db.execute(
                f"SELECT study_uid FROM studies GROUP BY study_uid HAVING "
                f"MAX(last_received) <= ? AND SUM(state NOT IN {finished}) = 0 AND "
                f"SUM(pruned_at IS NULL) > 0",
                (cutoff,),
            ).fetchall()
        return [r[0] for r in rows]

    def pruned(self, study_uid: str) -> None:
        """The study's spool is gone: its instances are forgotten (one sent again is a new
        revision), its rows stay, marked."""
        with self._transaction() as db:
            db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
            db.execute(
                "UPDATE studies SET pruned_at = ? WHERE study_uid = ? AND pruned_at IS NULL",
                (self._clock(), study_uid),
            )

    # ----------------------------------------------------------------------- the node

    def describe_node(self, **values: str) -> None:
        """What ``--status`` shows about the running node (model, its verdict)."""
        with self._transaction() as db:
            db.execute("DELETE FROM node")
            db.executemany(
                "INSERT INTO node (key, value) VALUES (?, ?)",
                [(k, str(v)) for k, v in values.items()],
            )

    # ----------------------------------------------------------------------- reading

    def table(self) -> pd.DataFrame:
        with self._lock:
            frame = pd.read_sql_query("SELECT * FROM studies ORDER BY id", self._db)
        return frame[STATUS_COLUMNS]


def _read_only(store: str | Path) -> sqlite3.Connection:
    path = Path(store) / DATABASE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no serve record here (is {store} a --store folder?)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def read_status(store: str | Path) -> pd.DataFrame:
    """The record's studies, read-only (a running node keeps writing meanwhile)."""
    db = _read_only(store)
    try:
        frame = pd.read_sql_query("SELECT * FROM studies ORDER BY id", db)
    finally:
        db.close()
    return frame.reindex(columns=STATUS_COLUMNS)  # a record not yet upgraded lacks some


def read_node(store: str | Path) -> dict[str, str]:
    db = _read_only(store)
    try:
        return dict(db.execute("SELECT key, value FROM node").fetchall())
    except sqlite3.OperationalError:  # a record written before the node was described
        return {}
    finally:
        db.close()


def format_node(node: dict[str, str]) -> str:
    """The model the node serves and whether it ranks, as the last start recorded it."""
    if not node:
        return "model: not recorded (the node has not started with this version)"
    line = (
        f"model {node.get('model', '?')} on {node.get('backend', '?')}: {node.get('verdict', '?')}"
    )
    if node.get("allow_chance") == "yes":
        line += " (served with --allow-chance)"
    return line


def format_status(table: pd.DataFrame) -> str:
    """The record as a console table: times in UTC, long UIDs and errors shortened."""
    if table.empty:
        return "no studies received yet"
    shown = table.copy()
    for column in ("last_received", "processed_at", "sent_at", "pruned_at"):
        shown[column] = pd.to_datetime(shown[column], unit="s", utc=True).dt.strftime(
            "%Y-%m-%d %H:%M:%S"
        )
    shown["study_uid"] = shown["study_uid"].map(lambda u: u if len(u) <= 24 else "…" + u[-23:])
    shown["probability"] = shown["probability"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}")
    shown["threshold"] = shown["threshold"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}")
    shown["decision"] = shown["decision"].map(lambda d: "" if pd.isna(d) else str(int(d)))
    shown = shown.drop(columns=["series_uid"]).fillna("")
    for column in ("partial", "error", "send_error"):
        shown[column] = shown[column].map(lambda e: e if len(e) <= 60 else e[:59] + "…")
    return shown.to_string(index=False)


def status_text(store: str | Path) -> str:
    """What ``serve --status`` prints: the model line, then the record."""
    return f"{format_node(read_node(store))}\n{format_status(read_status(store))}"
