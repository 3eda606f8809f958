"""``brainmets serve``: a DICOM node beside PACS for a silent (shadow) deployment.

Scanners or PACS send head CT studies by C-STORE (``scp``, admitted by ``admission``); every
acknowledged instance is in the ``spool`` on disk first. A study is scored once no instance
arrived for the stability window and its series looks complete (``completeness``), by the
same path as ``predict`` (``scoring``, through ``brainmets.predict.score_items``); its result
is a DICOM SR and Grad-CAM secondary captures (``brainmets.dicom_results``), sent on to PACS
(``forward``). The SQLite record (``record``) holds each study's state, so that a restart
finishes what a crash left, and scores each study once; ``node`` runs the threads.
"""

DEFAULT_STABLE_SECONDS = 30.0
"""Orthanc waits 60 s; scanners send a head CT within seconds of its last slice, and a study
split by a pause is scored again with everything (a new revision), so half that is enough."""

DEFAULT_INCOMPLETE_SECONDS = 600.0
"""How long a study whose series has a gap waits for its missing slices before it is scored
anyway (its result marked partial): longer than a PACS usually takes to retry a failed send."""

DEFAULT_KEEP_DAYS = 7.0
"""The spool of a finished study is deleted this long after its last instance arrived: late
instances within a week still join the study they belong to."""
