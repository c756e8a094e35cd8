"""bidvl/io.py: files written whole or not at all, and their digests."""

import hashlib
import os

import numpy as np
import pytest

from bidvl.io import atomic_path, file_sha256, temp_path, write_bytes, write_text


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
