"""Receipt of one instance, whichever way it came (C-STORE, or pulled by WADO-RS): the checks it
passes before it is kept, and keeping it, in the spool first (fsync) and then in the record.

What cannot be scored is refused instance by instance: a UID that is not one (over 64
characters, or not digits and dots without leading zeros: it would be written into the SR and
captures PACS receives), pixel data shorter than its header describes (a transfer cut short),
or compressed pixel data that does not decode. An instance already held with the same content
(its digest) is not written again, so that a retry succeeds even on a full disk.
"""

from __future__ import annotations

import logging
import sqlite3

from pydicom.dataset import Dataset
from pydicom.uid import UID

from brainmets.serve.record import Receipt, Record
from brainmets.serve.spool import Spool

log = logging.getLogger(__name__)

CT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

STUDY_UID, SERIES_UID, SOP_UID, PATIENT_ID = 0x0020000D, 0x0020000E, 0x00080018, 0x00100020


def raw_text(ds: Dataset, tag: int) -> str:
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


def instance_problem(ds: Dataset) -> str | None:
    """Why a head CT instance cannot be kept (its UIDs, its pixel data), or None."""
    for keyword, tag in (("StudyInstanceUID", STUDY_UID), ("SeriesInstanceUID", SERIES_UID),
                         ("SOPInstanceUID", SOP_UID)):  # fmt: skip
        problem = uid_problem(keyword, raw_text(ds, tag))
        if problem:
            return problem
    return pixel_data_problem(ds)


class NotKept(Exception):
    """A temporary failure to keep an instance (the free-space floor, a disk or database
    error): the sender, or the next pull, tries again."""


def keep_instance(
    spool: Spool,
    record: Record,
    *,
    study_uid: str,
    sop_uid: str,
    patient_id: str,
    digest: str,
    encoded: bytes,
    min_free_bytes: int,
    source: str = "",
) -> Receipt | None:
    """Spool and record a checked instance (``encoded``: the file as it is kept); None when
    the same content was held already. ``source`` names the DICOMweb server it was pulled
    from, so that it is never fetched again. Raises :class:`NotKept`."""
    try:
        if record.held(sop_uid, digest):
            return None
        free = spool.free_bytes()
        if free < min_free_bytes:
            raise NotKept(f"{free >> 20} MB free, below the floor")
        path = spool.write(study_uid, sop_uid, encoded)
        receipt = record.receive(
            study_uid, sop_uid, str(path), digest=digest, patient_id=patient_id, source=source
        )
    except (OSError, sqlite3.Error) as err:
        raise NotKept(f"cannot store: {getattr(err, 'strerror', None) or err}") from None
    if receipt.changed:
        log.warning(
            "instance %s of study %s sent again with other content: kept, and the study is "
            "scored again (revision %d)",
            sop_uid, short_uid(study_uid), receipt.revision,
        )  # fmt: skip
    return receipt


def short_uid(uid: str) -> str:
    """A UID's tail: enough to find its row, short enough for a log line."""
    return uid if len(uid) <= 16 else "…" + uid[-15:]
