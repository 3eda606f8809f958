"""Reception: a pynetdicom Storage SCP that answers C-ECHO and C-STORE.

Head CT arrives as CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT; every other
storage SOP class is negotiated, so that its sender gets a DIMSE status that says why it was
refused (0x0122) instead of a bare association failure. An instance is acknowledged only after
it is durably in the spool (temporary name, fsync, rename, fsync of the folder) and recorded.
What cannot be scored is refused at once, instance by instance (0xC210, the reason in the
error comment): a UID that is not one (over 64 characters, or not digits and dots without
leading zeros), pixel data shorter than its header describes, or compressed pixel data that
does not decode. A temporary failure (a full disk, the free-space floor) is 0xA700, which
senders retry; an instance already held with the same content is acknowledged without
writing anything, so a retry succeeds even then.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import UID

from brainmets.serve.admission import (
    REJECT_CALLING_AE,
    REJECT_CONGESTION,
    REJECT_LIMIT,
    Limits,
    Throttle,
    Visit,
    quiet_pynetdicom,
)
from brainmets.serve.record import Receipt, Record
from brainmets.serve.spool import Spool, instance_digest

log = logging.getLogger(__name__)
quiet_pynetdicom()

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

STUDY_UID, SERIES_UID, SOP_UID, PATIENT_ID = 0x0020000D, 0x0020000E, 0x00080018, 0x00100020


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # an LO element
    return status


def _raw_text(ds: Dataset, tag: int) -> str:
    """An element's text as sent, without pydicom converting (and warning about) it."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip(" \0")


def uid_problem(keyword: str, value: str) -> str | None:
    """Why ``value`` is not a valid UID (PS3.5 9.1: at most 64 characters, components of
    digits without a leading zero, separated by dots), or None."""
    if not value:
        return f"{keyword} is missing"
    if len(value) > 64:
        return f"{keyword} has {len(value)} characters (at most 64)"
    if not UID(value).is_valid:
        return f"{keyword} {value!r} is not a valid UID"
    return None


def pixel_data_problem(ds: Dataset) -> str | None:
    """Why the pixel data cannot be read: uncompressed data shorter than Rows x Columns x
    samples x frames describe (a transfer cut short), or compressed data that does not
    decode. Refused now rather than failing the whole study when it is scored."""
    if "PixelData" not in ds:
        return None
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as err:  # noqa: BLE001 - any decoder failure is the instance's
            return f"pixel data cannot be decoded ({type(err).__name__})"
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


class _Refusal(Exception):
    """An instance answered with a failure status."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class StorageSCP:
    """The listening node: C-ECHO, and C-STORE of head CT into the spool and the record.

    ``on_received`` is called with the receipt of each instance recorded (the node logs a
    study's arrival); the handler never does more than decode, write and record, so reception
    is never held up by scoring or forwarding."""

    def __init__(
        self,
        spool: Spool,
        record: Record,
        *,
        ae_title: str = "BRAINMETS",
        allow: Sequence[str] = (),
        limits: Limits | None = None,
        on_received: Callable[[str, Receipt, str], None] | None = None,
    ):
        self.spool = spool
        self.record = record
        self.ae_title = ae_title
        self.allow = {a.strip() for a in allow}
        self.limits = limits or Limits()
        self.on_received = on_received
        self._server = None
        self._ae = None
        self._lock = threading.Lock()
        self._visits: dict[int, Visit] = {}
        self._say = Throttle(log)
        self.counts = {"stored": 0, "already held": 0, "refused": 0}

    def _count(self, visit: Visit, key: str) -> None:
        with self._lock:
            self.counts[key] += 1
            visit.counts[key] += 1

    def _visit(self, event) -> Visit:
        requestor = event.assoc.requestor
        with self._lock:
            return self._visits.setdefault(
                id(event.assoc), Visit(address=f"{requestor.address}:{requestor.port}")
            )

    def _application_entity(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 0.5 MB slices
        self.limits.configure(ae)
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            uid = context.abstract_syntax
            # CT in any transfer syntax the decoders read; other classes only to refuse them.
            syntaxes = ALL_TRANSFER_SYNTAXES if uid in CT_STORAGE else context.transfer_syntax
            ae.add_supported_context(uid, syntaxes)
        return ae

    # ----------------------------------------------------------------------- associations

    def _on_requested(self, event) -> None:
        """Admission, before negotiation: the allow list, the free-space floor, the limit."""
        reject = self._admission(event)
        if reject:
            event.assoc.acse.send_reject(*reject)
            # As pynetdicom's own refusals: wait until the peer has the A-ASSOCIATE-RJ.
            event.assoc.kill()

    def _admission(self, event) -> tuple[int, int, int] | None:
        visit = self._visit(event)
        visit.requested = True
        visit.calling_ae = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        who = f"AE {visit.calling_ae!r} at {visit.address}"
        limits = self.limits
        if self.allow and visit.calling_ae not in self.allow:
            self._say(logging.WARNING, f"allow {visit.calling_ae}",
                      "refused an association from %s: calling AE title not in --allow", who)  # fmt: skip
            return REJECT_CALLING_AE
        free = self.spool.free_bytes()
        if free < limits.min_free_bytes:
            self._say(
                logging.ERROR,
                "floor",
                "refused an association from %s: %d MB free in %s, below the floor of %d MB "
                "(--min-free-mb); free space there",
                who, free >> 20, self.spool.root, limits.min_free_bytes >> 20,
            )  # fmt: skip
            return REJECT_CONGESTION
        acceptors = [a for a in self._ae.active_associations if a.is_acceptor]
        if len(acceptors) > limits.max_associations:
            self._say(
                logging.WARNING,
                "limit",
                "refused an association from %s: %d connections open, the limit is %d "
                "(--max-associations)",
                who, len(acceptors) - 1, limits.max_associations,
            )  # fmt: skip
            return REJECT_LIMIT
        return None

    def _on_established(self, event) -> None:
        visit = self._visit(event)
        visit.established = True
        log.debug("association from AE %r at %s", visit.calling_ae, visit.address)

    def _on_aborted(self, event) -> None:
        visit = self._visit(event)
        if event.assoc.dul.idle_timer_expired():
            self._say(
                logging.WARNING,
                "idle association",
                "aborted the association from AE %r at %s: no traffic for %g s "
                "(--idle-seconds); %s",
                visit.calling_ae, visit.address, self.limits.idle_seconds, visit.summary(),
            )  # fmt: skip
            visit.counts = dict.fromkeys(visit.counts, 0)  # said

    def _on_closed(self, event) -> None:
        with self._lock:
            visit = self._visits.pop(id(event.assoc), None)
        if visit is None:
            return
        seconds = time.monotonic() - visit.opened
        if not visit.requested and seconds < 0.9 * self._ae.acse_timeout:
            # A port probe (a monitor's TCP check) that closed its own connection.
            log.debug("connection from %s closed without an association", visit.address)
        elif not visit.requested:
            self._say(
                logging.WARNING,
                "silent connection",
                "closed a connection from %s that sent no association request in %.0f s",
                visit.address, seconds,
            )  # fmt: skip
        elif visit.busy():
            ended = "aborted" if event.assoc.is_aborted else "ended"
            log.info("association from AE %r %s after %.1f s: %s", visit.calling_ae, ended,
                     seconds, visit.summary())  # fmt: skip

    def _connection_allowed(self, request, client_address) -> bool:
        """Every connection is a thread: past twice the association limit (silent peers hold
        a place until ``request_seconds``), new ones are closed at once."""
        cap = 2 * self.limits.max_associations
        if len(self._ae.active_associations) < cap:
            return True
        self._say(logging.WARNING, "cap", "closed a connection from %s at once: %d connections "
                  "open (twice --max-associations)", client_address[0], cap)  # fmt: skip
        return False

    # ----------------------------------------------------------------------- C-STORE

    def _on_store(self, event) -> int | Dataset:
        visit = self._visit(event)
        try:
            receipt, study_uid, patient_id = self._store(event)
        except _Refusal as refusal:
            self._count(visit, "refused")
            return _status(refusal.code, str(refusal))
        if receipt is None:
            self._count(visit, "already held")
            return SUCCESS
        self._count(visit, "stored")
        if self.on_received:
            self.on_received(study_uid, receipt, visit.calling_ae)
        return SUCCESS

    def _store(self, event) -> tuple[Receipt | None, str, str]:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in CT_STORAGE:
            self._refuse_class(event, UID(sop_class).name, calling)
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = _raw_text(ds, SOP_UID) or sop_uid
            for keyword, tag in (("StudyInstanceUID", STUDY_UID), ("SeriesInstanceUID",
                                 SERIES_UID), ("SOPInstanceUID", SOP_UID)):  # fmt: skip
                problem = uid_problem(keyword, _raw_text(ds, tag))
                if problem:
                    raise ValueError(problem)
            problem = pixel_data_problem(ds)
            if problem:
                raise ValueError(problem)
        except Exception as err:  # noqa: BLE001 - whatever the peer sent, it gets a status
            reason = str(err) or type(err).__name__
            shown = sop_uid if len(sop_uid) <= 64 else sop_uid[:61] + "..."
            self._say(logging.WARNING, f"refused {reason[:24]}",
                      "refused instance %s from %s: %s", shown, calling, reason)  # fmt: skip
            raise _Refusal(CANNOT_UNDERSTAND, reason) from None
        return self._keep(event, ds, _raw_text(ds, STUDY_UID), sop_uid)

    def _refuse_class(self, event, name: str, calling: str) -> None:
        """Another SOP class: refused, and its study gets a failed row saying why (when
        nothing else of it was accepted), so that it does not vanish from the record."""
        log.warning("refused a %s instance from %s: only head CT is scored", name, calling)
        try:
            study_uid = _raw_text(event.dataset, STUDY_UID)
            if uid_problem("StudyInstanceUID", study_uid) is None:
                self.record.refuse(study_uid, f"refused: {name} (only CT is accepted)")
        except Exception:  # noqa: BLE001 - the refusal stands whatever the dataset or record
            log.debug("could not record the refusal", exc_info=True)
        raise _Refusal(SOP_CLASS_NOT_SUPPORTED, f"{name} not accepted: CT only")

    def _keep(self, event, ds, study_uid: str, sop_uid: str) -> tuple[Receipt | None, str, str]:
        """Spool and record a valid instance (None: the same content was held already)."""
        digest = instance_digest(ds.file_meta.TransferSyntaxUID, event.encoded_dataset(False))
        try:
            if self.record.held(sop_uid, digest):
                return None, study_uid, ""
            free = self.spool.free_bytes()
            if free < self.limits.min_free_bytes:
                raise _Refusal(OUT_OF_RESOURCES, f"{free >> 20} MB free, below the floor")
            path = self.spool.write(study_uid, sop_uid, event.encoded_dataset())
            patient_id = _raw_text(ds, PATIENT_ID)
            receipt = self.record.receive(
                study_uid, sop_uid, str(path), digest=digest, patient_id=patient_id
            )
        except (OSError, sqlite3.Error) as err:
            reason = getattr(err, "strerror", None) or str(err)
            self._say(logging.ERROR, "store", "could not store instance %s: %s (answered "
                      "0xA700, which senders retry)", sop_uid, reason)  # fmt: skip
            raise _Refusal(OUT_OF_RESOURCES, f"cannot store: {reason}") from None
        if receipt.changed:
            log.warning(
                "instance %s of study %s sent again with other content: kept, and the study "
                "is scored again (revision %d)",
                sop_uid, short_uid(study_uid), receipt.revision,
            )  # fmt: skip
        return receipt, study_uid, patient_id

    # ----------------------------------------------------------------------- life

    def start(self, host: str, port: int) -> int:
        """Listen (non-blocking); returns the port (a free one when ``port`` is 0)."""
        from pynetdicom import evt

        self._ae = self._application_entity()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, self._visit),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        self._server = self._ae.start_server((host, port), block=False, evt_handlers=handlers)
        self._server.verify_request = self._connection_allowed
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            for assoc in self._ae.active_associations:  # a sender mid-study retries later
                assoc.abort()


def short_uid(uid: str) -> str:
    """A UID's tail: enough to find its row, short enough for a log line."""
    return uid if len(uid) <= 16 else "…" + uid[-15:]
