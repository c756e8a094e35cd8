"""bidvl/io.py: files written whole or not at all, and their digests."""

import hashlib
import os

import numpy as np
import pytest

from bidvl import io
from bidvl.errors import BidvlError
from bidvl.io import WriteError, atomic_path, file_sha256, temp_path, write_bytes, write_text


def test_a_write_replaces_the_target_whole(tmp_path):
    target = tmp_path / "sub" / "report.json"
    assert write_text(target, "old\n") == target  # parents are created
    write_text(target, "new\n", fsync=True)
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temp left


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("zip writer"),
                                   KeyboardInterrupt()])
def test_a_failed_write_of_any_type_leaves_the_old_target_and_no_temp(tmp_path, error):
    target = tmp_path / "meta.json"
    target.write_text("good\n")
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise error
    assert target.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_what_the_file_system_refuses_is_a_write_error_naming_the_file_and_nothing_else_is(tmp_path, monkeypatch):
    """An OSError (full disk, quota, read-only folder), or a library's error on a full disk, is a
    WriteError (a BidvlError: one line, exit 2, from every command) naming the target and the errno;
    the caller's own errors keep their type."""
    target = tmp_path / "report.json"
    write_text(target, "good\n")
    with pytest.raises(WriteError, match=rf"^cannot write {target}: EDQUOT \(Disk quota exceeded\); the previous "
                                         r"report.json, if any, is untouched$") as caught:
        with atomic_path(target):
            raise OSError(122, "Disk quota exceeded")
    assert isinstance(caught.value, BidvlError) and isinstance(caught.value, OSError)
    with pytest.raises(WriteError, match=r"^cannot write .*/nested/x.json: ENOTDIR"):
        write_text(target / "nested" / "x.json", "{}")  # a file among the parents
    with pytest.raises(ValueError, match="^not the disk's$"):
        with atomic_path(target):
            raise ValueError("not the disk's")
    with pytest.raises(RuntimeError, match="^zip writer$"):  # enough free space: the library's own error
        with atomic_path(target):
            raise RuntimeError("zip writer")
    full = type("usage", (), {"free": 4096})
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: full)
    with pytest.raises(WriteError, match=r"^cannot write .*report.json: ENOSPC \(no space left on device; "
                                         r"RuntimeError: file write failed\)"):
        with atomic_path(target):
            raise RuntimeError("file write failed")
    assert target.read_text() == "good\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_temp_names_are_hidden_per_process_and_keep_a_suffix_when_asked(tmp_path):
    target = tmp_path / "samples.npy"
    tmp = temp_path(target)
    assert tmp.parent == tmp_path and tmp.name == f".samples.npy.tmp{os.getpid()}"
    assert not list(tmp_path.glob("*.npy"))  # (nothing yet)
    with atomic_path(target, suffix=target.suffix) as tmp:
        assert tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))  # numpy would append .npy to a name without it
    assert np.load(target).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npy"]


def test_file_sha256_is_the_digest_of_the_bytes_across_blocks(tmp_path):
    data = os.urandom((1 << 20) + 12345)  # more than one 1 MiB block
    path = write_bytes(tmp_path / "blob", data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(write_bytes(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()
