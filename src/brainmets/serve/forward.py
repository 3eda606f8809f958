"""Forwarding: the result objects of each scored study go to PACS, by C-STORE to an AE
(``AET@HOST:PORT``) or by STOW-RS to a DICOMweb service (``http://host:8042/dicom-web``).

A destination that is down costs only the forwarder's time: reception and scoring go on in
their own threads, every attempt is recorded, and the next comes after an exponential back-off
(capped), also after a restart, since the record keeps what was not sent. Both ways are one
attempt per study (one association, one STOW-RS request), retried by the same rules.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from pydicom import dcmread

from brainmets.dicomweb import DicomwebError, check_url, client, is_url, require, store

log = logging.getLogger(__name__)

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A peer AE: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DESTINATION.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(
                f"--forward {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs:4242, or a "
                "STOW-RS URL, e.g. http://pacs:8042/dicom-web"
            )
        return cls(match["ae"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, files: list[str], *, calling_ae: str) -> None:
        send_files(self, files, calling_ae=calling_ae)


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service root that takes STOW-RS: ``http(s)://host:port/path``."""

    url: str

    @classmethod
    def parse(cls, text: str) -> StowDestination:
        destination = cls(check_url(text.strip(), "--forward"))
        require()
        return destination

    def __str__(self) -> str:
        return self.url

    def send(self, files: list[str], *, calling_ae: str) -> None:
        """STOW-RS every file in one request (``calling_ae`` names nobody over HTTP)."""
        try:
            store(client(self.url), files, self.url)
        except DicomwebError as err:
            raise SendError(str(err)) from None


def parse_destination(text: str) -> Destination | StowDestination:
    """``--forward``: an AE (``AET@HOST:PORT``) or a STOW-RS service root (``http://...``)."""
    if is_url(text.strip()):
        return StowDestination.parse(text)
    return Destination.parse(text)


def backoff(attempts: int, base: float = 5.0, cap: float = 300.0) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 5, 10, 20 … 300."""
    return min(cap, base * 2 ** max(attempts - 1, 0))


class SendError(Exception):
    """The destination could not be reached or did not store every object."""


def send_files(
    destination: Destination, files: list[str], *, calling_ae: str, timeout: float = 30.0
) -> None:
    """C-STORE ``files`` in one association; raises :class:`SendError` unless every one was
    stored (a warning status counts as stored, as PS3.4 B.2.3 says)."""
    from pynetdicom import AE

    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid, syntax in sorted(
        {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    ):
        ae.add_requested_context(uid, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {destination}")
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{destination} did not answer the C-STORE of {path}")
            if code != 0 and not 0xB000 <= code <= 0xBFFF:
                raise SendError(f"{destination} refused {path}: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
