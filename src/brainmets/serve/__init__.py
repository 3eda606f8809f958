"""``brainmets serve``: a DICOM node beside PACS for a silent (shadow) deployment.

Scanners or PACS send head CT studies by C-STORE (``scp``); every acknowledged instance is in
the spool on disk first. A study is scored once no instance arrived for the stability window
(``node``), by the same path as ``predict`` (``brainmets.predict.predict_study``); its result
is a DICOM SR and Grad-CAM secondary captures (``brainmets.dicom_results``), sent on to PACS
(``forward``). The SQLite record (``record``) holds each study's state, so that a restart
finishes what a crash left, and scores each study once.
"""

DEFAULT_STABLE_SECONDS = 30.0
"""Orthanc waits 60 s; scanners send a head CT within seconds of its last slice, and a study
split by a pause is scored again with everything (a new revision), so half that is enough."""
