"""A training run's folder while a trainer owns it: its lock, its log, its start and its undoing.

One run per folder: rank 0 holds an advisory lock on ``RUN/.lock`` from the start to the end,
so a second ``train`` into the same folder is refused before it writes anything. ``train.log``
collects the log of every start and resume. A run that cannot start removes what it wrote
(checkpoints/, splits.csv, config.yaml ...) and keeps the log, which says why.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from brainmets import rundir
from brainmets.io import exclusive_lock

log = logging.getLogger("brainmets")


class RunFolder:
    """``RUN/`` and the files a trainer keeps there; ``is_main``: this process writes them."""

    def __init__(self, path: str | Path, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / rundir.CHECKPOINTS
        self.state_path = self.checkpoints / rundir.RESUME_STATE
        self._before = _entries(self.path)
        self._owned = contextlib.ExitStack()
        self._log_handler: logging.Handler | None = None

    def claim(self) -> None:
        """Take the folder's lock (rank 0): a second run is refused here, naming the first."""
        if self.is_main:
            self._owned.enter_context(
                exclusive_lock(self.path / rundir.LOCK, f"run folder {self.path}")
            )

    def check(self, resume: bool) -> None:
        """A resume needs a saved state; a new run must not overwrite one."""
        if resume and not self.state_path.is_file():
            raise FileNotFoundError(
                f"cannot resume {self.path}: {self.state_path} does not exist "
                "(the run never saved a checkpoint)"
            )
        if not resume and self.state_path.is_file():
            raise FileExistsError(
                f"{self.path} already holds a run ({self.state_path}); resume it with "
                "--resume or choose another run directory"
            )
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    def open_log(self) -> None:
        """Append the ``brainmets`` log to ``train.log`` (rank 0) until :meth:`close`."""
        if not self.is_main:
            return
        handler = logging.FileHandler(self.path / rundir.LOG, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        self._log_handler = handler

    def log_failed_start(self, err: BaseException) -> None:
        """Into train.log only, which would end without a word: the caller shows the error on
        the console (the CLI as its one-line message)."""
        if self._log_handler is None:
            return
        self._log_handler.handle(
            log.makeRecord(
                log.name, logging.ERROR, __file__, 0,
                "training could not start: %s: %s", (type(err).__name__, err), None,
            )
        )  # fmt: skip

    def undo_start(self) -> None:
        """Remove what a run that could not start wrote, keeping what the folder held before
        and the log."""
        if not self.is_main:
            return
        for name in (_entries(self.path) or set()) - (self._before or set()):
            if name != rundir.LOG:
                path = self.path / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)
        if self._before is None and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()  # failed before its log was opened: no trace at all

    def close(self) -> None:
        """Detach the log (later runs of this process must not write into this run's file)
        and release the lock."""
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._owned.close()


def _entries(folder: Path) -> set[str] | None:
    """The names in ``folder``; None when it does not exist."""
    return {p.name for p in folder.iterdir()} if folder.is_dir() else None
