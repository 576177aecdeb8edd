"""AlertFile: the pending → published protocol of exactly-once alert files."""

import os

import pytest

from diapipe.alerts import AlertFile, AlertValidationError, read_alerts


def test_prepare_commit_publishes_atomically(tmp_path):
    f = AlertFile(tmp_path / "alerts", 960200, 3)
    assert f.prepare([]) == 0
    assert os.listdir(tmp_path / "alerts") == ["960200_3.avro.pending"]  # nothing published yet
    assert f.commit() == str(tmp_path / "alerts" / "960200_3.avro")
    assert os.listdir(tmp_path / "alerts") == ["960200_3.avro"]
    assert read_alerts(f.path) == []


def test_recover_states(tmp_path):
    f = AlertFile(tmp_path, 1, 2)
    assert f.recover().state == "missing"
    f.prepare([])  # a run stored the detector-visit and died before commit
    found = AlertFile(tmp_path, 1, 2).recover()
    assert (found.state, found.path, found.n_packets) == ("published", f.path, 0)
    assert sorted(os.listdir(tmp_path)) == ["1_2.avro"]
    again = AlertFile(tmp_path, 1, 2).recover()
    assert again.state == "present"
    assert sorted(os.listdir(tmp_path)) == ["1_2.avro"]


def test_rewritten_pending_replaces_the_stale_one(tmp_path):
    """A run killed before its store leaves a pending file; the rerun's prepare replaces it."""
    f = AlertFile(tmp_path, 5, 0)
    f.prepare([])
    stale = os.stat(f.pending).st_ino
    g = AlertFile(tmp_path, 5, 0)
    g.prepare([])
    assert os.stat(g.pending).st_ino != stale  # a new file renamed over it, not appended to
    g.commit()
    assert sorted(os.listdir(tmp_path)) == ["5_0.avro"]


def test_invalid_packet_never_reaches_pending(tmp_path):
    f = AlertFile(tmp_path, 7, 1)
    with pytest.raises(AlertValidationError, match="missing .*diaSource"):
        f.prepare([{"diaSourceId": 1}])
    assert os.listdir(tmp_path) == []
