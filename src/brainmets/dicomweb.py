"""DICOMweb: STOW-RS stores result objects in an archive, QIDO-RS finds studies there and WADO-RS
fetches them, through dicomweb-client (the ``dicomweb`` extra).

Every request has a connect and a read timeout, so that a server that accepts a connection and
then says nothing costs a bounded wait. The callers decide about retries: serve keeps its own
back-off and record (dicomweb-client's retries are off there), predict lets dicomweb-client
retry the statuses that say "later" (429, 503, ...) a few times before a patient's row records
the failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from brainmets.io import require_package

TIMEOUT = (10.0, 60.0)
"""Seconds to connect, and to wait for each answer: an archive stores a study's few result
objects, or sends one CT slice, in well under a second."""

PREDICT_ATTEMPTS = 3
"""predict's tries of a STOW-RS request that the server answers with "later" (429, 503, 504):
a batch job rides out a short busy spell; anything longer is that patient's error row."""


class DicomwebError(Exception):
    """The server could not be reached, answered with an error, or did not store every object."""


def is_url(text: str | Path) -> bool:
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def check_url(url: str, option: str) -> str:
    """``url`` without a trailing slash; a clear error for one dicomweb-client cannot use."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{option} {url!r}: expected a DICOMweb URL, e.g. http://pacs:8042/dicom-web"
        )
    if parts.username or parts.password:
        raise ValueError(
            f"{option}: credentials in the URL are not supported (and would be logged); "
            "reach the server on a closed network or through a local proxy"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"{option} {url!r}: the service root takes no query or fragment")
    return url.rstrip("/")


def require() -> None:
    """Fail at the start, naming the extra, rather than at the first result to post."""
    require_package("dicomweb_client", "DICOMweb", extra="dicomweb")


def client(url: str, *, retry_attempts: int = 1, timeout: tuple[float, float] = TIMEOUT):
    """A dicomweb-client session for the service root ``url`` (e.g. Orthanc's
    ``http://host:8042/dicom-web``), with bounded timeouts."""
    dicomweb_client = require_package("dicomweb_client", "DICOMweb", extra="dicomweb")
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # A kept-alive connection the server closed meanwhile (Orthanc closes idle ones) fails the
    # next request before it is sent: a query or a fetch (GET) is tried once more at once.
    # A STOW-RS POST is not: its caller's back-off tries again.
    http = requests.Session()
    again = Retry(total=1, connect=1, read=1, status=0, other=0, allowed_methods={"GET"})
    for scheme in ("http://", "https://"):
        http.mount(scheme, HTTPAdapter(max_retries=again))
    session = dicomweb_client.DICOMwebClient(url, session=http, timeout=timeout)
    if retry_attempts > 1:
        session.set_http_retry_params(retry=True, max_attempts=retry_attempts)
    else:
        session.set_http_retry_params(retry=False)
    return session


def describe(err: BaseException) -> str:
    """One line for a failed request: the HTTP status and the server's reason, or the
    connection failure, without a traceback."""
    response = getattr(err, "response", None)
    attempt = getattr(err, "last_attempt", None)  # retries spent on "later" answers
    if response is None and attempt is not None and not attempt.has_exception:
        response = attempt.value
    if response is not None:
        body = (response.text or "").strip().replace("\n", " ")
        return f"HTTP {response.status_code} {response.reason}" + (
            f": {body[:200]}" if body else ""
        )
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def store(session, files: Sequence[str | Path], url: str = "") -> None:
    """STOW-RS ``files`` in one request; raises :class:`DicomwebError` unless the server
    stored every one of them. A stored object with a warning (coerced attributes) counts as
    stored, as a C-STORE warning does."""
    from pydicom import dcmread

    datasets = [dcmread(f) for f in files]
    where = url or session.base_url
    try:
        answer = session.store_instances(datasets)
    except Exception as err:  # noqa: BLE001 - requests', retrying's and a parser's errors alike
        raise DicomwebError(f"{where}: {describe(err)}") from None
    failed = [
        f"{item.get('ReferencedSOPInstanceUID', '?')} (failure reason {item.get('FailureReason', '?')})"
        for item in answer.get("FailedSOPSequence", [])
    ]
    if failed:
        raise DicomwebError(f"{where} did not store {', '.join(failed)}")
    if "ReferencedSOPSequence" in answer:  # an empty answer to a 200 means all were stored
        stored = {item.get("ReferencedSOPInstanceUID") for item in answer.ReferencedSOPSequence}
        missing = [
            f for f, ds in zip(files, datasets, strict=True) if ds.SOPInstanceUID not in stored
        ]
        if missing:
            raise DicomwebError(f"{where} did not confirm storing {', '.join(map(str, missing))}")


def post_results(url: str, files: Sequence[str | Path]) -> None:
    """``predict --dicom-out URL``: one patient's result objects in one STOW-RS request."""
    store(client(url, retry_attempts=PREDICT_ATTEMPTS), files, url)
