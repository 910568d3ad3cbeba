"""Where everything lives in the storage folder, and how a file gets there safely.

:class:`StorageLayout` owns every path under the node's storage folder::

    studies/<study>/<series>/<sop>.dcm   received instances (the spool)
    tmp/                                 partial writes, removed at start-up
    results/<hash of the job key>/       one folder per job: prediction, encoded objects
    outbox/                              objects waiting for their destinations + outbox.sqlite3
    index.sqlite3                        the instance/study index
    jobs.sqlite3                         the durable job queue (SQLite back-end)
    audit/, keys/                        the audit trail and its keys (unless configured)
    .running                             present while a node runs (an unclean stop leaves it)

:class:`JobKey` is the one place a job's key is built and read back, and
:func:`atomic_write` the one way a file is written so that it is either whole or
absent after a crash (temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.core.uids import check_uid

__all__ = ["JobKey", "StorageLayout", "atomic_write", "fsync_dir"]

INDEX_FILENAME = "index.sqlite3"
JOBS_FILENAME = "jobs.sqlite3"
OUTBOX_DIRNAME = "outbox"


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that entries created or renamed in it survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: bytes | Callable[[Path], None], *,
                 mode: int = 0o600) -> None:
    """Write ``path`` so that after a crash it is either absent, the old file, or the
    whole new one: write a temp file beside it, fsync it, rename it over ``path`` and
    fsync the folder. The file is owner-only (``mode``, 0600) whatever the umask.

    ``content`` is the bytes, or a function that writes the file at the path it is
    given (and may check it: if it raises, the temp file is removed and nothing else
    changes).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        if isinstance(content, bytes | bytearray | memoryview):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            content(tmp)
            os.chmod(tmp, mode)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def folder_name(job_key: str) -> str:
    """The name of a job's folder under ``results/``: a hash of its key."""
    return hashlib.sha256(job_key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class JobKey:
    """The idempotency key of a job: one per (study revision, rule, series, model).

    Written as ``<study>/<revision>/<rule>/<series>/<model>``; a repeated hand-off of
    the same completion makes the same key, so the queue adds nothing twice.
    """

    study_uid: str
    revision: int
    rule: str
    series_uid: str
    model: str

    def __str__(self) -> str:
        return f"{self.study_uid}/{self.revision}/{self.rule}/{self.series_uid}/{self.model}"

    @classmethod
    def parse(cls, key: str) -> JobKey:
        """Read a key back; raises ValueError naming what is wrong. The rule name may
        itself contain slashes: study, revision, series and model are fixed places."""
        parts = str(key).split("/")
        if len(parts) < 5:
            raise ValueError(f"job key {key!r}: expected study/revision/rule/series/model")
        try:
            revision = int(parts[1])
        except ValueError:
            raise ValueError(f"job key {key!r}: revision {parts[1]!r} is not a number") from None
        return cls(parts[0], revision, "/".join(parts[2:-2]), parts[-2], parts[-1])

    @property
    def folder_name(self) -> str:
        """The name of this job's folder under ``results/``."""
        return folder_name(str(self))

    def previous(self) -> JobKey | None:
        """The same job on the study's previous revision, if there is one."""
        if self.revision <= 1:
            return None
        return JobKey(self.study_uid, self.revision - 1, self.rule, self.series_uid, self.model)


class StorageLayout:
    """Every path under one storage folder (creates nothing until asked)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def outbox(self) -> Path:
        return self.root / OUTBOX_DIRNAME

    @property
    def index_db(self) -> Path:
        return self.root / INDEX_FILENAME

    @property
    def jobs_db(self) -> Path:
        return self.root / JOBS_FILENAME

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def running_marker(self) -> Path:
        return self.root / ".running"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance is stored; every UID is checked first, so that no path
        can leave the storage folder."""
        study = check_uid(study_uid, "Study Instance UID")
        series = check_uid(series_uid, "Series Instance UID")
        sop = check_uid(sop_uid, "SOP Instance UID")
        return self.studies / study / series / f"{sop}.dcm"

    def relative(self, path: Path) -> str:
        """``path`` relative to the storage folder, as stored in the index."""
        return str(Path(path).relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        """The absolute path of an index entry; refuses anything outside the folder."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"{relative!r} lies outside the storage folder")
        return path

    def result_dir(self, key: JobKey | str) -> Path:
        """The folder of one job's prediction and encoded objects (named by a hash of
        the job's key, whatever its form)."""
        return self.results / folder_name(str(key))
