"""dce_kernels.atomic: whole files or the old ones, fsynced, and locks born complete."""
import os

import pytest

from dce_kernels import atomic


def test_write_replaces_the_whole_file_and_fsyncs_it_and_its_directory(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(
        f"/proc/self/fd/{fd}")), real_fsync(fd)))
    atomic.write_atomic(path, lambda f: f.write("a,b\r\n1,2\r\n"))
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"  # written as given (csv line ends)
    assert synced == [str(tmp_path / "table.csv.tmp"), str(tmp_path)]
    assert os.listdir(tmp_path) == ["table.csv"]


def test_a_failing_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("{}")

    def half_then_fail(f):
        f.write("{\"acc")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_atomic(path, half_then_fail)
    assert path.read_text() == "{}"


def test_binary_writes(tmp_path):
    blob = os.urandom(1000)
    atomic.write_atomic(tmp_path / "x.pt", lambda f: f.write(blob), binary=True)
    assert (tmp_path / "x.pt").read_bytes() == blob


def test_create_atomic_creates_once_with_its_content(tmp_path):
    lock = tmp_path / "lock"
    assert atomic.create_atomic(lock, "123@host")
    assert not atomic.create_atomic(lock, "456@host")
    assert lock.read_text() == "123@host"
    assert os.listdir(tmp_path) == ["lock"]
