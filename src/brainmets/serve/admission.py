"""Who may hold the node's time: association admission, timeouts, and log lines for each limit.

A hostile or broken peer must not block the senders that matter. Every connection gets a
thread (pynetdicom's server), so their number is bounded: past ``max_associations`` an
association request is refused (transient, "local limit exceeded", which senders retry), and
past twice that a connection is closed at once. A connection that sends no association
request within ``request_seconds``, or an association with no traffic for ``idle_seconds``,
is closed. Below ``min_free_bytes`` of free space new associations are refused (transient,
"temporary congestion") so that a full disk never half-stores a study. Each limit hit is
logged, once per kind and minute with a count of the others, since a flood would otherwise
flood the log too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user: calling AE not recognised
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # transient, provider: temporary congestion
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, provider: local limit exceeded


@dataclass(frozen=True)
class Limits:
    """Bounds on what peers may take: associations, time, and the disk."""

    max_associations: int = 32
    idle_seconds: float = 30.0
    """An established association with no traffic for this long is aborted (a sender
    between two instances is never idle that long)."""
    request_seconds: float = 10.0
    """A connection that sends no association request in this time is closed."""
    min_free_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_associations < 1:
            raise ValueError(f"--max-associations must be at least 1, not {self.max_associations}")
        if self.idle_seconds <= 0:
            raise ValueError(f"--idle-seconds must be positive, not {self.idle_seconds:g}")
        if self.min_free_bytes < 0:
            raise ValueError("--min-free-mb cannot be negative")

    def configure(self, ae) -> None:
        """Set pynetdicom's timeouts and its own association limit on ``ae``."""
        ae.acse_timeout = min(self.request_seconds, self.idle_seconds)
        ae.network_timeout = self.idle_seconds
        ae.dimse_timeout = self.idle_seconds
        ae.maximum_associations = self.max_associations


class Throttle:
    """Log a kind of event at most once per ``every`` seconds, then with the count of those
    not logged meanwhile."""

    def __init__(self, logger: logging.Logger, every: float = 60.0, clock=time.monotonic):
        self.logger = logger
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, level: int, kind: str, message: str, *args) -> None:
        now = self.clock()
        with self._lock:
            last, skipped = self._seen.get(kind, (None, 0))
            if last is not None and now - last < self.every:
                self._seen[kind] = (last, skipped + 1)
                return
            self._seen[kind] = (now, 0)
        if skipped:
            message += f" ({skipped} more like it in the last {self.every:g} s)"
        self.logger.log(level, message, *args)


@dataclass
class Visit:
    """One connection: who it is, when it came, and what its association did."""

    address: str
    opened: float = field(default_factory=time.monotonic)
    calling_ae: str = ""
    requested: bool = False
    established: bool = False
    counts: dict[str, int] = field(
        default_factory=lambda: {"stored": 0, "already held": 0, "refused": 0}
    )

    def summary(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in self.counts.items() if n) or "nothing sent"

    def busy(self) -> bool:
        return any(self.counts.values())


class _DropNetworkTimeout(logging.Filter):
    """pynetdicom logs every idle association it aborts as an ERROR ("Network timeout
    reached"); the node says it once, as what it is (see ``StorageSCP``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Network timeout reached"


def quiet_pynetdicom() -> None:
    # pynetdicom logs every association and request at INFO (thousands of lines per study),
    # and a peer's non-conformant UID as a WARNING the node answers with its own refusal.
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    association = logging.getLogger("pynetdicom.association")
    if not any(isinstance(f, _DropNetworkTimeout) for f in association.filters):
        association.addFilter(_DropNetworkTimeout())
