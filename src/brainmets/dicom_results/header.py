"""What the result objects copy from the source series, made fit to write.

The SR and the captures belong to the source study, so they carry its patient and study
identity. Real headers often lack some of it: de-identified data and some exports drop
PatientSex, AccessionNumber, StudyDate, StudyTime, StudyID or ReferringPhysicianName, or hold
values their VR does not allow. Each attribute copied is therefore handled by its type:

* type 1 (StudyInstanceUID; each instance's SOP class, SOP instance and series UIDs) must be
  a valid UID; the SOP class and instance UIDs may be derived from the file meta
  information; otherwise :class:`DicomResultError` names the file and the attribute;
* type 2 (the Patient and General Study modules' PatientName, PatientID, PatientBirthDate,
  PatientSex, StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber) is
  copied when valid for its VR and written empty (unknown) when absent, empty or invalid;
* a few type 3 attributes that help match the result to its study and scanner are copied
  only when valid.

Nothing else of the source header is copied (no address, age, weight or other personal data),
and no value is ever logged or put in an error message: only attribute names and files.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Patient and General Study attributes every result object has, empty when unknown."""

IDENTITY_OPTIONAL = (
    "IssuerOfPatientID",
    "StudyDescription",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)
OPTIONAL = (
    *IDENTITY_OPTIONAL,
    # The scanner, for the Contributing Equipment Sequence of each result object.
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
)
"""Type 3 attributes copied when the source holds a valid value."""

_ENUMERATED = {"PatientSex": {"M", "F", "O"}, "PatientIdentityRemoved": {"YES", "NO"}}
UTF8 = "ISO_IR 192"
PERSON_NAMES = ("PatientName", "ReferringPhysicianName")


class DicomResultError(ValueError):
    """A source series no valid result object can be made from; the message names the file
    and the attribute, never a value."""


def valid_uid(value: object) -> bool:
    """A UID of at most 64 characters in the UID grammar (PS3.5 9.1)."""
    return isinstance(value, str) and bool(value) and UID(value).is_valid


def _type1_uid(ds: Dataset, path: Path, keyword: str, meta_keyword: str | None = None) -> str:
    value = ds.get(keyword)
    if not value and meta_keyword is not None:
        meta = getattr(ds, "file_meta", None)
        value = meta.get(meta_keyword) if meta is not None else None
    if not value:
        raise DicomResultError(
            f"{path}: {keyword} is missing or empty; it is required (type 1) and cannot be "
            "derived, so no result can be filed with this series"
        )
    value = str(value)
    if not valid_uid(value):
        raise DicomResultError(
            f"{path}: {keyword} is not a valid UID ({len(value)} characters; at most 64 digits "
            "and dots); a result object holding it would not be valid DICOM"
        )
    return value


@dataclass(frozen=True)
class InstanceRef:
    """The four UIDs by which the result objects reference one source instance."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, ds: Dataset, path: str | Path) -> InstanceRef:
        path = Path(path)
        return cls(
            _type1_uid(ds, path, "StudyInstanceUID"),
            _type1_uid(ds, path, "SeriesInstanceUID"),
            _type1_uid(ds, path, "SOPClassUID", "MediaStorageSOPClassUID"),
            _type1_uid(ds, path, "SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        )

    def dataset(self) -> Dataset:
        """The instance as highdicom's evidence: only the UIDs it lists."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def _valid(keyword: str, value: object) -> bool:
    vr = dictionary_VR(keyword)
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if len(values) > 1 and dictionary_VM(keyword) == "1":
        return False  # a backslash in a single-valued attribute
    try:
        for item in values:
            validate_value(vr, str(item), config.RAISE)
    except (ValueError, TypeError):
        return False
    allowed = _ENUMERATED.get(keyword)
    return allowed is None or all(str(item) in allowed for item in values)


def _copyable(ds: Dataset, keyword: str) -> object | None:
    """The source's value of ``keyword`` when it may be written as it is, else None."""
    value = ds.get(keyword)
    if value is None or value == "" or (isinstance(value, MultiValue) and not value):
        return None
    return value if _valid(keyword, value) else None


def _needs_unicode(values: Iterable[object]) -> bool:
    return any(not str(v).isascii() for v in values if v is not None)


def study_header(
    ds: Dataset, path: str | Path, ref: InstanceRef, own_text: Iterable[str] = ()
) -> Dataset:
    """A header with the source's patient and study identity as the result objects carry it,
    for ``ref``'s instance (highdicom copies from it). ``own_text``: the strings brainmets
    writes itself, which decide the character set together with the copied values."""
    header = ref.dataset()
    invalid = []
    # pydicom's own check of a value it decodes logs the value (a birth date, say); ours
    # below names only the attribute.
    with config.disable_value_validation():
        for keyword in TYPE2:
            value = _copyable(ds, keyword)
            if value is None and ds.get(keyword) not in (None, ""):
                invalid.append(keyword)
            setattr(header, keyword, value)  # None: written empty, "unknown"
        for keyword in OPTIONAL:
            value = _copyable(ds, keyword)
            if value is not None:
                setattr(header, keyword, value)
        charset = ds.get("SpecificCharacterSet")
    if header.get("PatientIdentityRemoved") == "YES" and "DeidentificationMethod" not in header:
        # "YES" requires the method (type 1C); a source that does not say how cannot be
        # repeated validly, and the attribute is optional.
        del header.PatientIdentityRemoved
    if invalid:
        # Names only: the values are personal data.
        log.warning(
            "%s: %s not valid for %s VR; written empty in the results",
            path,
            ", ".join(invalid),
            "its" if len(invalid) == 1 else "their",
        )
    terms = list(charset) if isinstance(charset, MultiValue) else [charset]
    if charset is not None and not all(t in python_encoding for t in terms):
        # Not a DICOM defined term ("UTF-8", "latin1"): pydicom decoded the values as best it
        # could; the results state a character set a reader knows.
        charset = None
    copied = [str(header[k].value) for k in (*TYPE2, *OPTIONAL) if k in header]
    own = list(own_text)
    if (charset is None and _needs_unicode(copied + own)) or (
        charset is not None and charset != UTF8 and _needs_unicode(own)
    ):
        # Python holds the decoded text: UTF-8 writes the source's values and ours alike.
        charset = UTF8
    if charset is not None:
        header.SpecificCharacterSet = charset
    return header


def for_highdicom(header: Dataset) -> Dataset:
    """``header`` with its person names empty: highdicom warns about, and logs, a name it finds
    unusual (one without a caret, as de-identified data often has) with its value, and names
    are personal data. :func:`restore_identity` puts them into the finished object."""
    view = copy.deepcopy(header)
    for keyword in PERSON_NAMES:
        setattr(view, keyword, None)
    return view


def restore_identity(obj: Dataset, header: Dataset) -> None:
    """Put the person names, and the optional patient and study attributes highdicom leaves
    out of a secondary capture, into ``obj`` as ``header`` holds them."""
    for keyword in (*PERSON_NAMES, *IDENTITY_OPTIONAL):
        # A new element: highdicom may share the view's element objects with ``obj``.
        if keyword in obj:
            delattr(obj, keyword)
        if keyword in header:
            setattr(obj, keyword, header[keyword].value)
