"""Shards in an object store: `s3://bucket/prefix` read through fsspec (s3fs), written by
make_shards --publish, exactly like the local folder; a missing object fails at once, naming it.

A real S3 server (moto's server mode) listens on 127.0.0.1 on a free port, started and stopped by
the `s3` fixture; the client finds it through AWS_ENDPOINT_URL, as any S3 SDK user would point at
MinIO or Ceph.
"""

import io
import itertools
import subprocess
import sys
import time

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from conftest import ENV, REPO, TINY, weights
from bidvl.data import ShardError, split_info, train_stream
from bidvl.data import remote
from bidvl.data.remote import NetOptions

FAST = NetOptions(retries=1, backoff=0.05, timeout=10)
BUCKET = "shards"


@pytest.fixture
def s3(monkeypatch):
    """An S3 server on 127.0.0.1 with an empty bucket; the AWS_* settings that reach it."""
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a client made for another test's server
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def ids(source, n=12, **kwargs):
    kwargs = {"batch_size": 16, "seed": 3, "rank": 1, "world_size": 2, **kwargs}
    return [b[0].sum(dim=(1, 2, 3)).tolist() for b in itertools.islice(iter(train_stream(source, "train", **kwargs)), n)]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.process
def test_published_to_s3_the_shards_stream_what_the_local_folder_does(s3, digits16, workers):
    url = f"s3://{BUCKET}/datasets/digits16"
    written = remote.publish(digits16, url)
    assert written[-1] == f"{url}/meta.json"  # meta.json last: a reader never sees a missing shard
    assert len(written) == len(split_info(digits16, "train")[1]) + len(split_info(digits16, "test")[1]) + 1
    assert ids(url, num_workers=workers) == ids(digits16, num_workers=workers)
    last = len(split_info(digits16, "train")[1]) - 1
    assert ids(f"{url}/train-{{000000..{last:06d}}}.tar", num_workers=workers) == ids(digits16, num_workers=workers)


def test_a_missing_object_fails_at_once_naming_it(s3, digits16, capfd):
    with pytest.raises(ShardError, match=rf"s3://{BUCKET}/nothing/meta.json: no such object"):
        ids(f"s3://{BUCKET}/nothing")
    url = f"s3://{BUCKET}/datasets/digits16"
    remote.publish(digits16, url)
    gone = split_info(digits16, "train")[1][0].name
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"]).delete_object(Bucket=BUCKET, Key=f"datasets/digits16/{gone}")
    with pytest.raises(ShardError, match=rf"{url}/{gone}: no such object"):
        remote.read_bytes(f"{url}/{gone}", FAST)
    assert "retrying" not in capfd.readouterr().err  # not retried
    with pytest.raises(ShardError, match=rf"{url}/{gone}: no such object"):
        remote.check_exists(f"{url}/{gone}", FAST)


def test_a_store_that_drips_bytes_is_cut_off_at_the_shard_deadline(capfd):
    """data.net_shard_timeout bounds an object-store read as it bounds http(s) and pipe: ones: a
    store answering every block slowly (an fsspec file system of the test's own, registered as
    `drip://`, whose blocks take 0.2 s) fails after the deadline and one block, retried, named."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Dripping(io.BytesIO):
        def read(self, size=-1):
            time.sleep(0.2)
            return super().read(min(size, remote.CHUNK) if size and size > 0 else remote.CHUNK)

    class DripFileSystem(MemoryFileSystem):
        protocol = "drip"

        def _open(self, path, mode="rb", **kwargs):
            return Dripping(bytes(20 * remote.CHUNK))  # 20 blocks: 4 s in all

    fsspec.register_implementation("drip", DripFileSystem, clobber=True)
    start = time.monotonic()
    with pytest.raises(ShardError, match=r"drip://b/shard-000000\.tar: .*not read within 0\.5 s "
                                         r"\(data\.net_shard_timeout; \d+ bytes so far\)"):
        remote.read_bytes("drip://b/shard-000000.tar", NetOptions(retries=1, backoff=0.05, file_timeout=0.5))
    assert time.monotonic() - start < 2.5  # two tries of about 0.6 s, not 2 x 4 s
    assert "retrying" in capfd.readouterr().err


def test_store_errors_say_what_to_install_and_are_retried_otherwise(capfd):
    def missing_backend():
        raise ImportError("Install s3fs to access S3")

    with pytest.raises(ShardError, match=r"s3://b/k: reading s3:// needs s3fs \(pip install 'bidvl\[s3\]'\)"):
        remote._fsspec_call("s3://b/k", missing_backend)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("reset by peer")
        return b"data"

    assert remote._with_retries("s3://b/k", "shard", lambda: remote._fsspec_call("s3://b/k", flaky), FAST) == b"data"
    assert "warning: shard s3://b/k: ConnectionResetError: reset by peer; retrying" in capfd.readouterr().err


@pytest.mark.slow
def test_training_from_s3_gives_the_weights_of_the_local_folder(s3, digits16, tmp_path):
    """launch/train.py with data.train=s3://... (one loader worker) against the same run on the
    local folder: bit-identical weights."""
    url = f"s3://{BUCKET}/datasets/digits16"
    remote.publish(digits16, url)
    runs = {}
    for name, source in (("local", digits16), ("s3", url)):
        runs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={runs[name]}",
                               f"data.train={source}", "train.max_steps=6", "data.num_workers=1"],
                              env={**ENV, **s3}, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(runs["local"]), weights(runs["s3"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
