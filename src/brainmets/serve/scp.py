"""Reception: a pynetdicom Storage SCP that answers C-ECHO and C-STORE.

Head CT arrives as CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT; every other
storage SOP class is negotiated, so that its sender gets a DIMSE status that says why it was
refused (0x0122) instead of a bare association failure. An instance is acknowledged only after
it is durably in the spool (temporary name, fsync, rename, fsync of the folder) and recorded.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from brainmets.io import atomic_write
from brainmets.serve.record import Record

log = logging.getLogger(__name__)
# pynetdicom logs every association and request at INFO: thousands of lines per study.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

SPOOL = "spool"

CT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

# DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2.1.4).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC210
OUT_OF_RESOURCES = 0xA700

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # an LO element
    return status


def _fsync_dir(path: Path) -> None:
    """A rename is durable only once its folder is: fsync the directory entry too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """``STORE/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm``: received instances as sent."""

    def __init__(self, store: str | Path):
        self.root = Path(store) / SPOOL
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


def register_spooled(spool: Spool, record: Record) -> int:
    """Record the instances a crash left in the spool but out of the record (the file was
    renamed into place, the transaction not committed): they were received, so they are
    scored. Returns how many."""
    known = record.known_instances()
    added = 0
    for study_uid, sop_uid, path in spool.instances():
        if sop_uid not in known:
            record.receive(study_uid, sop_uid, str(path))
            added += 1
    return added


def _pixel_data_short(ds: Dataset) -> str | None:
    """Uncompressed pixel data shorter than Rows x Columns x samples x frames describe: a
    transfer cut short, refused now rather than failing the whole study when it is scored."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * frames
            * int(ds.BitsAllocated)
            + 7
        ) // 8
    except (AttributeError, TypeError, ValueError) as err:
        return f"image header incomplete ({err})"
    actual = len(ds.PixelData)
    if actual < expected:
        return f"pixel data has {actual} bytes, its header describes {expected}"
    return None


class StorageSCP:
    """The listening node: C-ECHO, and C-STORE of head CT into the spool and the record.

    ``on_received`` is called after each stored instance (the node uses it to log progress);
    the handler never does more than decode the header, write and record, so reception is
    never held up by scoring or forwarding."""

    def __init__(
        self,
        spool: Spool,
        record: Record,
        *,
        ae_title: str = "BRAINMETS",
        allow: Sequence[str] = (),
        on_received: Callable[[str], None] | None = None,
    ):
        self.spool = spool
        self.record = record
        self.ae_title = ae_title
        self.allow = {a.strip() for a in allow}
        self.on_received = on_received
        self._server = None
        self._lock = threading.Lock()
        self.counts = {"stored": 0, "refused": 0}

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _application_entity(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 0.5 MB slices
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            uid = context.abstract_syntax
            # CT in any transfer syntax the decoders read; other classes only to refuse them.
            syntaxes = ALL_TRANSFER_SYNTAXES if uid in CT_STORAGE else context.transfer_syntax
            ae.add_supported_context(uid, syntaxes)
        if self.allow:
            ae.require_calling_aet = sorted(self.allow)
        return ae

    def _on_store(self, event) -> int | Dataset:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in CT_STORAGE:
            name = UID(sop_class).name
            log.warning("refused a %s instance from %s: only head CT is scored", name, calling)
            self._count("refused")
            try:
                study_uid = str(event.dataset.StudyInstanceUID)
            except Exception:  # noqa: BLE001 - the refusal stands whatever the dataset holds
                study_uid = ""
            if _UID.match(study_uid):
                self.record.refuse(study_uid, f"refused: {name} (only CT is accepted)")
            return _status(SOP_CLASS_NOT_SUPPORTED, f"{name} not accepted: CT only")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study_uid = str(ds.StudyInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
            if not (_UID.match(study_uid) and _UID.match(sop_uid)):
                raise ValueError("StudyInstanceUID or SOPInstanceUID is not a valid UID")
            short = _pixel_data_short(ds)
            if short:
                raise ValueError(short)
        except Exception as err:  # noqa: BLE001 - whatever the peer sent, it gets a status
            reason = str(err) or type(err).__name__
            sop = event.request.AffectedSOPInstanceUID
            log.warning("refused instance %s from %s: %s", sop, calling, reason)
            self._count("refused")
            return _status(CANNOT_UNDERSTAND, reason)
        try:
            path = self.spool.write(study_uid, sop_uid, event.encoded_dataset())
            self.record.receive(study_uid, sop_uid, str(path))
        except OSError as err:
            log.error("could not store instance %s: %s", sop_uid, err)
            return _status(OUT_OF_RESOURCES, f"cannot store: {err.strerror or err}")
        self._count("stored")
        if self.on_received:
            self.on_received(study_uid)
        return SUCCESS

    def _on_rejected(self, event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        why = "calling AE title not in --allow" if calling not in self.allow else "rejected"
        log.warning("refused an association from AE %r: %s", calling, why)

    def start(self, host: str, port: int) -> int:
        """Listen (non-blocking); returns the port (a free one when ``port`` is 0)."""
        from pynetdicom import evt

        ae = self._application_entity()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
