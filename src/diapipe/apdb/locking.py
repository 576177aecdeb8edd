"""Serialise diaPipe's read-associate-write section across processes.

Why: ``pipetask run -j 2`` runs two diaPipe quanta at once. Two things go wrong
without a lock:

- sqlite allows one writer at a time; a second writer waiting longer than its
  busy timeout fails with "database is locked" (Rubin's users hit this).
- Worse, and for every backend: two overlapping detector-visits both load the
  DiaObjects *before* either has stored, so a new transient seen by both
  becomes two DiaObjects. Association is only right if a quantum's load sees
  every earlier quantum's store.

So the whole section (rerun check, load, associate, forced photometry, store)
holds an exclusive lock on the APDB: an ``fcntl.flock`` on ``<db>.lock`` beside
an sqlite file (released by the kernel if the process dies, so a killed run
never leaves a stale lock), or a PostgreSQL session advisory lock. The section
takes well under a second per detector-visit, so serialising it costs little.
`retry_locked` additionally retries the section with backoff if sqlite still
reports a lock (e.g. a user holding a long read transaction in a notebook).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import random
import time
import zlib
from pathlib import Path

__all__ = ["apdb_lock", "retry_locked", "is_locked_error", "ApdbLockTimeout"]

_LOG = logging.getLogger(__name__)


class ApdbLockTimeout(RuntimeError):
    """The APDB lock could not be taken in time."""


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float):
    with open(path, "a+") as stream:
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - start > timeout_s:
                    raise ApdbLockTimeout(
                        f"waited {timeout_s:.0f} s for the APDB lock {path}; another diaPipe process holds it"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)
        waited = time.monotonic() - start
        if waited > 1.0:
            _LOG.info("waited %.1f s for the APDB lock %s", waited, path)
        try:
            yield
        finally:
            fcntl.flock(stream.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_lock(apdb, key: int, timeout_s: float):
    import sqlalchemy

    engine = getattr(apdb, "_engine", None)
    if engine is None:  # not ApdbSql: nothing we can lock on
        _LOG.warning("cannot lock this APDB (%s); concurrent diaPipe quanta may race", type(apdb).__name__)
        yield
        return
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"SET lock_timeout = {int(timeout_s * 1000)}"))
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


@contextlib.contextmanager
def apdb_lock(apdb, *, timeout_s: float = 3600.0):
    """Hold an exclusive, cross-process lock on ``apdb`` (an `lsst.dax.apdb.Apdb`)."""
    from .connection import sqlite_path

    config = apdb.getConfig()
    db_url = getattr(config, "db_url", "")
    path = sqlite_path(db_url) if db_url else None
    if path is not None:
        with _file_lock(path.with_name(path.name + ".lock"), timeout_s):
            yield
    elif db_url.startswith("postgresql"):
        key = zlib.crc32(f"diapipe-apdb:{config.namespace}:{config.prefix}".encode()) & 0x7FFFFFFF
        with _pg_lock(apdb, key, timeout_s):
            yield
    else:
        yield


def is_locked_error(err: BaseException) -> bool:
    """Whether ``err`` is sqlite's "database is locked" / "busy" error."""
    text = str(getattr(err, "orig", None) or err).lower()
    return "database is locked" in text or "database is busy" in text


def retry_locked(func, *, attempts: int = 6, first_delay_s: float = 0.5, what: str = "APDB access"):
    """Call ``func()``; on sqlite lock errors retry with jittered exponential backoff.

    Safe because every write is one transaction (rolled back on failure).
    """
    import sqlalchemy

    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return func()
        except sqlalchemy.exc.OperationalError as err:
            if not is_locked_error(err) or attempt == attempts:
                raise
            _LOG.warning("%s: database is locked (attempt %d of %d); retrying in %.1f s", what, attempt, attempts, delay)
            time.sleep(delay * (1.0 + 0.25 * random.random()))
            delay *= 2.0
    raise AssertionError("unreachable")
