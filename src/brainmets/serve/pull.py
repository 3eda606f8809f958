"""Pull: for a site without a DIMSE route to the node, the node asks a DICOMweb server for head CT
studies (QIDO-RS) and fetches what it does not hold (WADO-RS) into the same spool and record
as C-STORE reception, through the same receipt checks (``receipt``).

Each poll lists the studies dated from the high-water mark less ``LOOKBACK_DAYS`` (a study
acquired late last night and archived this morning is still listed), page by page. A study is
looked at again only when the server lists another instance count for it than when it was
last pulled; then only the CT instances not fetched yet are fetched, each once: the record
keeps every instance fetched, with its outcome, for good. Instances that come after a study
was taken for scoring open its next revision, as late C-STORE instances do. The mark moves
up to the latest study date listed (never past today, nor past a study the server could not
send), and is kept in the record, so that a restart neither lists the past again nor fetches
anything twice.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from brainmets.dicomweb import check_url, client, describe
from brainmets.serve.admission import Throttle
from brainmets.serve.receipt import (
    CT_STORAGE,
    PATIENT_ID,
    SOP_UID,
    STUDY_UID,
    NotKept,
    instance_problem,
    keep_instance,
    raw_text,
    short_uid,
    uid_problem,
)
from brainmets.serve.record import Receipt, Record
from brainmets.serve.spool import Spool, part10_digest

log = logging.getLogger(__name__)

LOOKBACK_DAYS = 2
"""Each query starts this many days before the mark: a study archived a day after it was
acquired (a night scan, a delayed upload), or dated in another time zone, is still listed."""

MAX_PAGES = 1000
"""A bound on the pages of one listing (100,000 studies at the default page size), against a
server that ignores ``offset`` or never runs out."""

ANY_SYNTAX = (("application/dicom", "*"),)
"""WADO-RS: each instance in the transfer syntax it is stored in (as C-STORE would bring it),
not transcoded to Explicit VR Little Endian."""

# QIDO-RS attributes (PS3.18 Table 6.7.1-2), as the DICOM JSON model names them.
STUDY, STUDY_DATE, MODALITIES, STUDY_COUNT = "0020000D", "00080020", "00080061", "00201208"
SERIES, SOP_CLASS, SOP = "0020000E", "00080016", "00080018"


@dataclass(frozen=True)
class PullSource:
    """``--pull URL``: a DICOMweb service root, how often it is asked, the page size, and the
    first start's mark (``--pull-since``; later starts use the recorded one)."""

    url: str
    every: float = 30.0
    page: int = 100
    since: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_url(self.url, "--pull"))
        if self.every <= 0:
            raise ValueError(f"--pull-every must be positive, not {self.every:g}")
        if not 1 <= self.page <= 10_000:
            raise ValueError(f"--pull-page must be between 1 and 10000, not {self.page}")
        if self.since is not None and _date(self.since) is None:
            raise ValueError(f"--pull-since {self.since!r}: expected a date as YYYYMMDD")


def _date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except (TypeError, ValueError):
        return None


def _value(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class Listed:
    """A study as the server lists it."""

    study_uid: str
    date: dt.date | None
    instances: int | None
    modalities: frozenset[str]

    @classmethod
    def of(cls, item: dict) -> Listed:
        count = _value(item, STUDY_COUNT)
        return cls(
            study_uid=str(_value(item, STUDY) or ""),
            date=_date(str(_value(item, STUDY_DATE) or "")),
            instances=int(count) if count is not None else None,
            modalities=frozenset(item.get(MODALITIES, {}).get("Value") or ()),
        )


def _new_by_series(ct: list[dict], known: set[str]) -> dict[str, set[str]]:
    """The listed CT instances not fetched or received yet, by series."""
    found: dict[str, set[str]] = {}
    for item in ct:
        sop = str(_value(item, SOP) or "")
        if sop not in known:
            found.setdefault(str(_value(item, SERIES) or ""), set()).add(sop)
    return found


def _transient(err: BaseException) -> bool:
    """A failure of the network or the server (tried again later), not of the instance."""
    import requests

    return isinstance(err, requests.RequestException) or hasattr(err, "last_attempt")


def _part10(ds) -> tuple[bytes, str | None]:
    """The instance as a DICOM file (what the spool keeps), or why it cannot be one."""
    encoded = io.BytesIO()
    try:
        ds.save_as(encoded, enforce_file_format=True)
    except Exception as err:  # noqa: BLE001 - pydicom's errors for a data set it cannot write
        return b"", f"cannot be written as a DICOM file ({type(err).__name__}: {err})"[:200]
    return encoded.getvalue(), None


class PullFailed(Exception):
    """The server could not be listed: the whole poll is tried again."""


class StudyNotPulled(Exception):
    """One study the server could not list or send now: tried again at the next poll."""


class Puller:
    """Polls one DICOMweb server; ``poll()`` is one pass, run by the node's pull thread."""

    def __init__(
        self,
        source: PullSource,
        spool: Spool,
        record: Record,
        *,
        min_free_bytes: int = 0,
        on_received: Callable[[str, Receipt, str], None] | None = None,
        today: Callable[[], dt.date] = dt.date.today,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.source = source
        self.spool = spool
        self.record = record
        self.min_free_bytes = min_free_bytes
        self.on_received = on_received
        self.today = today
        self.stopping = stopping  # the node stops: a poll ends between two instances
        self.kept = 0  # instances kept by the current poll
        self.session = client(source.url)
        self._say = Throttle(log)
        # dicomweb-client logs every request at INFO: thousands of lines per study.
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

    def mark(self) -> dt.date:
        recorded = self.record.pull_mark(self.source.url)
        return _date(recorded or self.source.since or "") or self.today()

    def poll(self) -> int:
        """List the studies from the mark on, fetch what is new; returns the instances kept.
        A server that cannot be listed raises (the poll is tried again); a study it cannot
        send now stays for the next poll and holds the mark back."""
        url, mark = self.source.url, self.mark()
        try:
            listed = self._list(mark - dt.timedelta(days=LOOKBACK_DAYS))
        except Exception as err:  # noqa: BLE001 - requests', retrying's, a parser's
            raise PullFailed(f"listing studies: {describe(err)}") from None
        self.kept, pending = 0, []
        for study in listed:
            if self.stopping():
                return self.kept  # the mark stays: the next start lists the same again
            if study.modalities and "CT" not in study.modalities:
                continue
            if study.instances is not None and study.instances == self.record.listed(
                url, study.study_uid
            ):
                continue  # nothing new since it was pulled
            try:
                self._pull_study(study)
            except StudyNotPulled as err:
                if self.stopping():
                    return self.kept
                pending.append(study.date or mark)
                self._say(logging.WARNING, f"study {study.study_uid}", "study %s: not pulled "
                          "from %s now (%s); tried again at the next poll",
                          short_uid(study.study_uid), url, err)  # fmt: skip
        # The newest study date listed, but never in the future (a scanner's clock set wrong
        # would hide every later study) nor past a study still to pull.
        dates = [s.date for s in listed if s.date is not None]
        high = min([max(dates, default=mark), self.today(), *pending])
        self.record.set_pull_mark(url, max(mark, high).strftime("%Y%m%d"))
        return self.kept

    # ----------------------------------------------------------------------- QIDO-RS

    def _list(self, since: dt.date) -> list[Listed]:
        """Every study dated ``since`` or later, a page at a time. Modality is not a filter:
        Orthanc answers ``ModalitiesInStudy`` with ``offset`` with an empty page, so it is
        asked for and read here."""
        found: dict[str, Listed] = {}
        page = self.source.page
        for number in range(MAX_PAGES):
            items = self.session.search_for_studies(
                search_filters={"StudyDate": f"{since:%Y%m%d}-"},
                fields=["ModalitiesInStudy", "NumberOfStudyRelatedInstances"],
                limit=page,
                offset=number * page,
            )
            new = [s for s in map(Listed.of, items) if s.study_uid and s.study_uid not in found]
            found.update((s.study_uid, s) for s in new)
            if len(items) < page or not new:
                break
        else:
            log.warning("pull: listing %s stopped after %d pages", self.source.url, MAX_PAGES)
        return list(found.values())

    def _instances(self, study_uid: str) -> list[dict]:
        items: list[dict] = []
        page = self.source.page
        for number in range(MAX_PAGES):
            batch = self.session.search_for_instances(
                study_instance_uid=study_uid,
                fields=["SOPClassUID"],
                limit=page,
                offset=number * page,
            )
            items += batch
            if len(batch) < page:
                break
        return items

    # ----------------------------------------------------------------------- WADO-RS

    def _pull_study(self, study: Listed) -> None:
        url, uid = self.source.url, study.study_uid
        problem = uid_problem("StudyInstanceUID", uid)
        if problem:  # listed, never fetched: the study gets a failed row saying why
            self.record.refuse(uid[:200], f"pulled: {problem}")
            self.record.pulled(url, uid, study.instances or 0)
            return
        try:
            instances = self._instances(uid)
        except Exception as err:  # noqa: BLE001 - the server's or the client's, for this study
            raise StudyNotPulled(describe(err)) from None
        known = self.record.fetched_instances(uid)
        ct = [i for i in instances if _value(i, SOP_CLASS) in CT_STORAGE]
        for series, wanted in _new_by_series(ct, known).items():
            listed = sum(_value(i, SERIES) == series for i in ct)
            if len(wanted) > 1 and len(wanted) == listed:  # none held: in one request
                wanted = self._fetch_series(uid, series, wanted)
            for sop in sorted(wanted):
                if self.stopping():
                    raise StudyNotPulled("the node stops")
                self._fetch(uid, series, sop)
        if instances and not ct:
            classes = sorted({str(_value(i, SOP_CLASS)) for i in instances})
            self.record.refuse(
                uid, f"pulled: no CT image instances (SOP classes {', '.join(classes)})"
            )
        self.record.pulled(
            url, uid, study.instances if study.instances is not None else len(instances)
        )

    def _fetch_series(self, study_uid: str, series_uid: str, wanted: set[str]) -> set[str]:
        """Fetch a whole series in one WADO-RS request and keep the ``wanted`` instances;
        returns those it did not bring, to be fetched one by one. Orthanc answers one request
        per instance in about 90 ms, a series in about 3 ms per instance."""
        wanted = set(wanted)
        try:
            stream = self.session.iter_series(study_uid, series_uid, media_types=ANY_SYNTAX)
            while wanted:
                if self.stopping():
                    raise StudyNotPulled("the node stops")
                try:
                    ds = next(stream)
                except StopIteration:
                    break
                sop = raw_text(ds, SOP_UID)
                if sop in wanted:
                    wanted.discard(sop)
                    self._take(ds, study_uid, sop)
        except (StudyNotPulled, NotKept, sqlite3.Error):
            raise
        except Exception as err:  # noqa: BLE001 - the network's, the server's, or a part's
            import requests

            if isinstance(err, (requests.ConnectionError, requests.Timeout)):
                raise StudyNotPulled(describe(err)) from None
            # A server that will not send the series (an error status), or a part that does
            # not parse: the rest one by one, so that only a bad instance is refused.
            log.debug("series %s: fetched one by one (%s)", series_uid, describe(err))
        return wanted

    def _fetch(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Fetch one instance and keep it, or record why it is refused."""
        problem = uid_problem("SeriesInstanceUID", series_uid) or uid_problem(
            "SOPInstanceUID", sop_uid
        )
        if problem:
            self._refuse(study_uid, sop_uid, problem)
            return
        try:
            ds = self.session.retrieve_instance(
                study_uid, series_uid, sop_uid, media_types=ANY_SYNTAX
            )
        except Exception as err:  # noqa: BLE001 - the network's, the server's, or the file's
            if _transient(err):
                raise StudyNotPulled(describe(err)) from None
            self._refuse(study_uid, sop_uid, f"cannot be read ({type(err).__name__})")
            return
        self._take(ds, study_uid, sop_uid)

    def _take(self, ds, study_uid: str, sop_uid: str) -> None:
        """The receipt of a fetched instance: checked, then kept, or refused for good."""
        problem = self._problem(ds, study_uid, sop_uid)
        if problem is None:
            data, problem = _part10(ds)
        if problem:
            self._refuse(study_uid, sop_uid, problem)
            return
        url = self.source.url
        receipt = keep_instance(
            self.spool,
            self.record,
            study_uid=study_uid,
            sop_uid=sop_uid,
            patient_id=raw_text(ds, PATIENT_ID),
            digest=part10_digest(data),
            encoded=data,
            min_free_bytes=self.min_free_bytes,
            source=url,
        )
        if receipt is None:
            return
        self.kept += 1
        if self.on_received:
            self.on_received(study_uid, receipt, f"DICOMweb {url}")

    def _refuse(self, study_uid: str, sop_uid: str, problem: str) -> None:
        url = self.source.url
        self._say(logging.WARNING, f"refused {problem[:24]}",
                  "refused instance %s pulled from %s: %s", sop_uid, url, problem)  # fmt: skip
        self.record.fetch_refused(url, study_uid, sop_uid, problem)

    @staticmethod
    def _problem(ds, study_uid: str, sop_uid: str) -> str | None:
        """The receipt checks of C-STORE, and that the server sent what was asked for."""
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in CT_STORAGE:
            return f"SOP class {sop_class or 'missing'} is not CT"
        if raw_text(ds, STUDY_UID) != study_uid or str(ds.get("SOPInstanceUID", "")) != sop_uid:
            return "the server sent another instance than the one asked for"
        try:
            return instance_problem(ds)
        except Exception as err:  # noqa: BLE001 - a header that cannot be read
            return f"cannot be read ({type(err).__name__})"
