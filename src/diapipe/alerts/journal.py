"""Exactly-once alert files: write ahead of the APDB store, publish after it.

An alert must exist for every DiaSource the APDB holds, once. Writing the
alerts *after* ``Apdb.store`` loses them if the process dies in between (a
rerun finds the detector-visit in the APDB and skips it); writing them
*before* publishes alerts of sources that may never be stored. So the file of
a detector-visit goes through two names, both changed only under diaPipe's
APDB lock:

1. ``prepare``: before the store, the packets are written (temporary file,
   fsync, rename) to ``{visit}_{detector}.avro.pending``. Consumers ignore
   ``.pending`` files.
2. the APDB store commits (one transaction).
3. ``commit``: ``.pending`` is renamed to ``{visit}_{detector}.avro``
   (atomic on POSIX; the folder is fsynced).

A process killed before 2 leaves a ``.pending`` file of sources that are not
stored: the rerun finds the detector-visit absent from the APDB, recomputes
it and overwrites the ``.pending`` file. A process killed between 2 and 3
leaves a ``.pending`` file of exactly what was stored: the rerun finds the
detector-visit in the APDB and `recover` publishes that file. Either way each
stored DiaSource ends up in exactly one published file, and the published
file's packets are those built from the data the store committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = ["AlertFile", "AlertFileState"]

_LOG = logging.getLogger(__name__)


@dataclass
class AlertFileState:
    """What `AlertFile.recover` found: ``present`` (already published),
    ``published`` (a pending file published now) or ``missing``."""

    state: str
    path: str
    n_packets: int = 0


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AlertFile:
    """The alert file of one detector-visit in ``folder`` (see the module docstring).

    Parameters
    ----------
    folder : `str` or path-like
        Folder of the Avro files (created on first write).
    visit, detector : `int`
        The detector-visit; the file is ``{visit}_{detector}.avro``.
    """

    def __init__(self, folder, visit: int, detector: int):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, f"{int(visit)}_{int(detector)}.avro")
        self.pending = self.path + ".pending"
        self.n_packets = 0

    def prepare(self, packets: Iterable[Mapping], schema: dict | None = None) -> int:
        """Write (validated) ``packets`` to the pending file, replacing any earlier one.

        Call before the APDB store, under the APDB lock. Returns the number of packets.
        """
        from .packets import write_alerts

        os.makedirs(self.folder, exist_ok=True)
        self.n_packets = write_alerts(packets, self.pending, schema)
        return self.n_packets

    def commit(self) -> str:
        """Publish the pending file (call right after the store committed, under the lock)."""
        if os.path.exists(self.path):
            _LOG.warning(
                "replacing %s: this detector-visit was stored again (a new APDB with the same alertsPath?)",
                self.path,
            )
        os.replace(self.pending, self.path)
        _fsync_dir(self.folder)
        return self.path

    def recover(self, count: Callable[[str], int] | None = None) -> AlertFileState:
        """For a detector-visit the APDB already holds: publish its pending file if the
        process that stored it died before `commit`.

        ``count(path)`` gives the number of packets of a file (default: read it).
        """
        from .packets import read_alerts

        count = count or (lambda path: len(read_alerts(path)))
        if os.path.exists(self.path):
            if os.path.exists(self.pending):
                # stored, published, and a later attempt's pending file (cannot happen
                # under the lock, but never publish it over the stored one's)
                os.remove(self.pending)
            return AlertFileState("present", self.path, count(self.path))
        if os.path.exists(self.pending):
            os.replace(self.pending, self.path)
            _fsync_dir(self.folder)
            return AlertFileState("published", self.path, count(self.path))
        return AlertFileState("missing", self.path, 0)
