"""The spool: every acknowledged instance, as sent, at ``STORE/spool/<study>/<sop>.dcm``.

An instance is in the spool before it is acknowledged (temporary name, fsync, rename, fsync
of the folder), so that a crash loses nothing a sender was told was stored. The spool shrinks
by the retention policy: a study's instances are deleted ``keep_days`` after its last arrival,
once nothing of it waits (every result sent, or failed for good). Its record rows stay.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from brainmets.io import atomic_write
from brainmets.serve.record import Record

log = logging.getLogger(__name__)

SPOOL = "spool"
RESULTS = "results"


def instance_digest(transfer_syntax: str, dataset: bytes) -> str:
    """SHA-256 of an instance as sent (its data set and transfer syntax): what tells a
    sender's retry (the same) from new content under a known SOP instance UID. The file meta
    pynetdicom adds is left out, since it names the sender."""
    digest = hashlib.sha256(str(transfer_syntax).encode("ascii") + b"\0")
    digest.update(dataset)
    return digest.hexdigest()


def spooled_digest(path: Path) -> str:
    """:func:`instance_digest` of a spool file (the data set follows the file meta)."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, group length
    return instance_digest(meta.TransferSyntaxUID, path.read_bytes()[start:])


def _fsync_dir(path: Path) -> None:
    """A rename is durable only once its folder is: fsync the directory entry too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """``STORE/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm``: received instances as sent.

    Both UIDs are validated at receipt (at most 64 characters of digits and dots), so they
    are safe as file names."""

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.root = self.store / SPOOL
        self.root.mkdir(parents=True, exist_ok=True)

    def study_dir(self, study_uid: str) -> Path:
        return self.root / study_uid

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        folder = self.study_dir(study_uid)
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)
        path = atomic_write(folder / f"{sop_uid}.dcm", lambda fh: fh.write(data))
        _fsync_dir(folder)
        return path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def instances(self) -> list[tuple[str, str, Path]]:
        """(study UID, SOP instance UID, path) of every instance in the spool; temporary
        files a crash left behind (never acknowledged) are removed."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                elif path.suffix == ".dcm":
                    found.append((folder.name, path.stem, path))
        return found

    def remove(self, study_uid: str) -> None:
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)


def register_spooled(spool: Spool, record: Record) -> int:
    """Record the instances a crash left in the spool but out of the record (the file was
    renamed into place, the transaction not committed): they were received, so they are
    scored. Returns how many."""
    known = record.known_instances()
    added = 0
    for study_uid, sop_uid, path in spool.instances():
        if sop_uid not in known:
            record.receive(study_uid, sop_uid, str(path), digest=_digest_or_empty(path))
            added += 1
    return added


def _digest_or_empty(path: Path) -> str:
    """A damaged file a crash left is still recorded (scoring will say what is wrong)."""
    try:
        return spooled_digest(path)
    except Exception:  # noqa: BLE001 - any unreadable file: no digest to compare
        return ""


def prune_results(folder: Path, keep: set[str]) -> None:
    """Delete a study's result files but ``keep`` (the SR a later revision would name as
    the one it replaces): the captures and older revisions are in PACS already."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and str(path) not in keep:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def apply_retention(
    spool: Spool, record: Record, keep_seconds: float, *, forwarding: bool, now: float
) -> int:
    """Delete the spool (and the result files but the last SR) of every study past the
    retention time with nothing waiting. Returns how many studies."""
    pruned = 0
    for study_uid in record.expired(now - keep_seconds, forwarding=forwarding):
        latest = record.previous_results(study_uid, revision=1 << 30)
        keep = {path for path in latest if path.endswith("_sr.dcm")}
        spool.remove(study_uid)
        prune_results(spool.store / RESULTS / study_uid, keep)
        record.pruned(study_uid)
        pruned += 1
    if pruned:
        log.info("retention: the spool of %d studies deleted (their record stays)", pruned)
    return pruned
