"""Shards from anywhere: a folder URL over HTTP, a `pipe:` command template and explicit
brace-expanded shard lists read exactly like the local folder, network faults are retried within
data.net_retries and then named, and a 404 fails before training starts.

    train_stream("http://127.0.0.1:8000/digits16", "train", 16, seed=0, num_workers=1)
    train_stream("pipe:cat shards/digits16/{}", "train", 16, seed=0)
    train_stream("shards/digits16/train-{000000..000031}.tar", "train", 16, seed=0)

A real `http.server` on 127.0.0.1 (random port, started and stopped by the `server` fixture)
serves the digits shards; it can answer 503, drop connections mid-shard, hold requests, stop and
start again on the same port.
"""

import hashlib
import http.server
import json
import importlib.util
import io
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, ENV, REPO, TINY, finish, weights
from bidvl.checkpoint import verify
from bidvl.run_dir import complete_checkpoints, step_of
from bidvl.config import ConfigError, load_config
from bidvl.data import ShardError, ShardStream, eval_stream, split_info, train_stream
from bidvl.data.reader import shuffled
from bidvl.data.remote import NetOptions

FAST = NetOptions(retries=2, backoff=0.05, timeout=10)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=str(server.owner.root))

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        owner = self.server.owner
        if self.path.endswith(".tar"):
            action = owner.on_tar_get(self.path)
            if action == "503":
                self.send_error(503, "Service Unavailable")
                return
            if action == "drip":  # announce the whole shard, then send a byte every 0.2 s
                data = (owner.root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i: i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:  # the client gave up
                    pass
                self.close_connection = True
                return
            if action == "drop":  # announce the whole shard, send half of it, hang up
                data = (owner.root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
        super().do_GET()


class ShardServer:
    """http.server over a shards root; `faults` maps a shard path to the actions of its next GETs
    ("503", "drop", "drip"); `hold_after` N holds every .tar GET after the N-th until `release()`;
    `drip_after` N drips every .tar GET after the N-th (a byte every 0.2 s)."""

    def __init__(self, root: Path):
        self.root, self.port, self.httpd = root, 0, None
        self.stopped_at = None
        self.tar_gets = 0
        self.faults: dict[str, list[str]] = {}
        self.hold_after = None
        self.drip_after = None
        self.released = threading.Event()
        self.lock = threading.Lock()

    def on_tar_get(self, path: str) -> str:
        with self.lock:
            self.tar_gets += 1
            held = self.hold_after is not None and self.tar_gets > self.hold_after
            queue = self.faults.get(path)
            action = queue.pop(0) if queue else "ok"
            if self.drip_after is not None and self.tar_gets > self.drip_after:
                action = "drip"
        if held:
            self.released.wait(120)
        return action

    def start(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def release(self):
        self.released.set()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop_after(self, gets: int, restart_after: float | None) -> threading.Thread:
        """From a thread: once `gets` shards were served, stop; start again `restart_after` s later."""

        def watch():
            while self.tar_gets < gets:
                time.sleep(0.01)
            self.stop()
            self.stopped_at = time.monotonic()
            if restart_after is not None:
                time.sleep(restart_after)
                self.start()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def server(digits16):
    """Serves the folder holding digits16/ (so its URL is server.url('digits16'))."""
    s = ShardServer(digits16.parent)
    s.start()
    yield s
    s.release()
    s.stop()


def ids(batches):
    return [b[0].sum(dim=(1, 2, 3)).tolist() for b in batches]


def first(source, n=12, **kwargs):
    kwargs = {"batch_size": 16, "seed": 3, **kwargs}
    return ids(itertools.islice(iter(train_stream(source, "train", **kwargs)), n))


# ------------------------------------------------------------------ every source reads the same


def test_our_shuffle_buffer_draws_what_webdatasets_did():
    """The buffer replaced a private webdataset function: same RNG calls, same order, so runs
    trained before keep their data order (and their weights)."""
    import webdataset.filters

    _shuffle = getattr(webdataset.filters, "_shuffle", None)
    if _shuffle is None:
        pytest.skip("this webdataset has no filters._shuffle to compare with")
    for bufsize, initial, n in ((10, 5, 100), (180, 100, 1000), (7, 100, 3), (2000, 100, 450)):
        ours = list(shuffled(iter(range(n)), bufsize, initial, random.Random(bufsize)))
        theirs = list(_shuffle(iter(range(n)), bufsize=bufsize, initial=initial, rng=random.Random(bufsize)))
        assert ours == theirs and sorted(ours) == list(range(n))


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.process
def test_url_pipe_and_shard_lists_stream_what_the_local_folder_does(server, digits16, workers):
    local = first(digits16, num_workers=workers, rank=1, world_size=2)
    last = len(split_info(digits16, "train")[1]) - 1
    for source in (server.url("digits16"), server.url("digits16/"), f"pipe:cat {digits16}/{{}}",
                   f"file://{digits16}"):
        assert first(source, num_workers=workers, rank=1, world_size=2) == local, source
    # Explicit lists read the counts from the meta.json beside them (a list of all the shards is
    # the folder) or from data.train_count.
    every = f"train-{{000000..{last:06d}}}.tar"
    assert first(f"{digits16}/{every}", num_workers=workers, rank=1, world_size=2) == local
    assert first(server.url(f"digits16/{every}"), num_workers=workers, rank=1, world_size=2) == local
    count = sum(split_info(digits16, "train")[2])
    assert first(f"pipe:cat {digits16}/{every}", num_workers=workers, rank=1, world_size=2, count=count,
                 resolution=16, channels=1) == local


@pytest.mark.process
def test_evaluation_reads_a_url_like_the_local_folder(server, digits16):
    def rows(source):
        return [(i.tolist(), x.sum(dim=(1, 2, 3)).tolist()) for x, _, i in eval_stream(source, "test", 40)]

    assert rows(server.url("digits16")) == rows(digits16) == rows(f"pipe:cat {digits16}/{{}}")


@pytest.mark.process
def test_fid_reference_statistics_of_a_url_equal_the_local_folders_and_are_cached_in_the_run(
        tmp_path, digits16, small_features):
    """A remote source's reference statistics are those of its local copy; they are cached in the
    run's folder (never beside the shards), reused without a shard download, and keyed by the
    per-shard digests make_shards writes into meta.json, so a rewritten dataset is recomputed."""
    import json

    import numpy as np

    from bidvl.data.meta import read_meta, write_meta
    from bidvl.evaluation.fid import feature_extractor, reference_statistics

    root = tmp_path / "root"
    shutil.copytree(digits16, root / "digits16", ignore=shutil.ignore_patterns("fid_stats"))
    entries = read_meta(root / "digits16")["splits"]["test"]["shards"]
    assert all(len(e["sha256"]) == 64 for e in entries)  # written by make_shards
    server = ShardServer(root)
    server.start()
    try:
        extractor = feature_extractor(features=str(small_features))
        local = reference_statistics(None, extractor, str(root / "digits16"), "test", 40)
        cache = tmp_path / "run" / "eval" / "cache"
        url = server.url("digits16")
        first = reference_statistics(None, extractor, url, "test", 40, fallback_dir=cache)
        assert first["count"] == local["count"] == sum(e["count"] for e in entries)
        np.testing.assert_allclose(first["mu"], local["mu"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(first["sigma"], local["sigma"], rtol=0, atol=1e-12)
        assert Path(first["cache"]).parent == cache and Path(first["cache"]).name.startswith("digits16-test-")
        piped = reference_statistics(None, extractor, f"pipe:cat {root / 'digits16'}/{{}}", "test", 40)
        np.testing.assert_allclose(piped["mu"], local["mu"], rtol=0, atol=1e-12)
        assert piped["cache"] == ""  # no run folder given: nothing cached, nothing written beside the shards

        gets = server.tar_gets
        again = reference_statistics(None, extractor, url, "test", 40, fallback_dir=cache)
        assert server.tar_gets == gets and again["cache"] == first["cache"]  # no shard read

        meta = json.loads((root / "digits16" / "meta.json").read_text())
        shard = root / "digits16" / meta["splits"]["test"]["shards"][0]["name"]
        data = bytearray(shard.read_bytes())  # the dataset was rewritten: one label byte changed
        with tarfile.open(shard) as tar:
            label = next(m for m in tar.getmembers() if m.name.endswith(".cls")).offset_data
        data[label] = ord("0") + (data[label] - ord("0") + 1) % 10
        shard.write_bytes(bytes(data))
        meta["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        meta.pop("format")
        write_meta(root / "digits16", meta)
        rewritten = reference_statistics(None, extractor, url, "test", 40, fallback_dir=cache)
        assert server.tar_gets > gets and rewritten["cache"] != first["cache"]
        for entry in meta["splits"]["test"]["shards"]:  # shards from before meta.json had digests
            del entry["sha256"]
        write_meta(root / "digits16", meta)
        with pytest.warns(UserWarning, match="records no shard digests"):
            reference_statistics(None, extractor, url, "test", 40, fallback_dir=cache)
    finally:
        server.stop()


@pytest.mark.process
def test_a_subset_list_counts_its_own_shards_and_resumes_exactly(server, digits16):
    source = server.url("digits16/train-{000002..000009}.tar")
    meta, shards, counts = split_info(source, "train")
    assert len(shards) == 8 and meta["splits"]["train"]["count"] == sum(counts)
    full = first(source, n=10, num_workers=1)
    assert first(source, n=4, num_workers=1, start_batch=6) == full[6:]


# ------------------------------------------------------------------ network faults


def test_503_and_dropped_connections_are_retried_and_change_nothing(server, digits16, capfd):
    local = first(digits16)
    for k in range(6):
        server.faults[f"/digits16/train-{k:06d}.tar"] = ["503", "drop"]
    assert first(server.url("digits16"), net=FAST) == local
    err = capfd.readouterr().err
    assert "HTTP 503" in err and "retrying in" in err
    assert "connection ended after" in err or "IncompleteRead" in err


def test_a_shard_failing_past_the_retry_budget_is_a_named_error_or_a_skipped_shard(server, digits16):
    shards = split_info(digits16, "train")[1]
    for s in shards:
        server.faults[f"/digits16/{s.name}"] = ["503"] * 3  # 1 try + 2 retries
    url = server.url("digits16")
    with pytest.raises(ShardError, match=rf"shard {url}/train-\d+\.tar: could not be read after 3 tries "
                                         rf"\(data.net_retries=2\): HTTP 503"):
        first(url, net=FAST)
    server.faults.clear()
    for s in shards[:3]:
        server.faults[f"/digits16/{s.name}"] = ["503"] * 30
    stream = iter(train_stream(url, "train", batch_size=16, seed=3, net=FAST, on_error="skip"))
    skipped = sum(next(stream)[2] for _ in range(8))
    assert skipped >= 1  # each failed fetch of a 503 shard counts as one bad shard


def test_evaluation_takes_the_retry_budget_it_is_given(server, digits16):
    """An evaluation stream reads its shards with the caller's retry settings (the test server
    injects faults into shard reads only, not meta.json's)."""
    url = server.url("digits16")
    for s in split_info(digits16, "test")[1]:
        server.faults[f"/digits16/{s.name}"] = ["503"] * 3
    with pytest.raises(ShardError, match=rf"shard {url}/test-\d+\.tar: could not be read after 3 tries"):
        next(iter(eval_stream(url, "test", batch_size=100, net=FAST)))
    server.faults.clear()


@pytest.mark.process
def test_a_missing_folder_or_shard_fails_at_once_naming_the_url(server, digits16, tmp_path):
    with pytest.raises(ShardError, match=rf"{server.url('nowhere/meta.json')}: HTTP 404.*\(no meta.json\)"):
        train_stream(server.url("nowhere"), "train", batch_size=16, seed=0, net=FAST)
    shutil.copytree(digits16, tmp_path / "gap")
    (tmp_path / "gap" / "train-000005.tar").unlink()
    server.root = tmp_path
    gone = server.url("gap/train-000005.tar")
    start = time.perf_counter()
    with pytest.raises(ShardError, match=rf"shard {gone}: HTTP 404 .*listed in"):
        train_stream(server.url("gap"), "train", batch_size=16, seed=0)  # default retries: not used
    with pytest.raises(ShardError, match=rf"shard {gone}: HTTP 404"):
        list(eval_stream(server.url("gap"), "train", 40))
    assert time.perf_counter() - start < 5
    with pytest.raises(ShardError, match=r"pipe:cat /nowhere/meta.json: could not be read after 1 try"):
        train_stream("pipe:cat /nowhere/{}", "train", batch_size=16, seed=0, net=NetOptions(retries=0))
    hostile = tmp_path / "hostile"
    shutil.copytree(digits16, hostile)
    meta = (hostile / "meta.json").read_text().replace("train-000000.tar", "x;touch pwned")
    (hostile / "meta.json").write_text(meta)
    with pytest.raises(ShardError, match=r"file name 'x;touch pwned' \(from meta.json\) is not safe"):
        train_stream(f"pipe:cd {hostile} && cat {{}}", "train", batch_size=16, seed=0)
    assert not (hostile / "pwned").exists()
    # A list without data.train_count is counted by reading its shards (a missing one named).
    with pytest.raises(ShardError, match=r"pipe:cat /x/train-000000.tar: could not be read after 1 try"):
        train_stream("pipe:cat /x/train-{000000..000003}.tar", "train", batch_size=16, seed=0, resolution=16,
                     channels=1, net=NetOptions(retries=0))


def test_the_same_strict_checks_name_the_url_and_member(server, digits16, tmp_path):
    shutil.copytree(digits16, tmp_path / "bad")
    shard = tmp_path / "bad" / "test-000000.tar"
    with tarfile.open(tmp_path / "renamed.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        with tarfile.open(shard) as original:
            for info in original.getmembers():
                data = original.extractfile(info).read()
                info.name = info.name.replace(".cls", ".pyd")
                tar.addfile(info, io.BytesIO(data))
    shutil.copy(tmp_path / "renamed.tar", shard)
    meta = json.loads((tmp_path / "bad" / "meta.json").read_text())  # its digest recorded: the member check speaks
    meta["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "bad" / "meta.json").write_text(json.dumps(meta))
    server.root = tmp_path
    with pytest.raises(ShardError, match=rf"shard {server.url('bad/test-000000.tar')}, sample .*: member "
                                         r"\.pyd is not allowed"):
        list(eval_stream(server.url("bad"), "test", 40))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ShardError, match=rf"shard {server.url('bad/test-000000.tar')}: truncated at offset \d+, after member "):
        list(eval_stream(server.url("bad"), "test", 40))


# ------------------------------------------------------------------ publishing


@pytest.mark.process
def test_make_shards_publishes_to_a_folder_or_a_pipe_template_meta_json_last(tmp_path, server):
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "launch/make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    (tmp_path / "bucket").mkdir()
    log = tmp_path / "order.txt"
    template = f"pipe:echo {{}} >> {log}; cat > {tmp_path}/bucket/{{}}"
    for dest in (str(tmp_path / "www" / "digits"), template):
        code = make_shards.main(["digits", "--resolution", "16", "--limit", "100", "--overwrite",
                                 "--out", str(tmp_path / "built"), "--publish", dest])
        assert code == 0
    names = log.read_text().split()
    assert names[-1] == "meta.json" and len(names) == len(set(names)) == 64 + 64 + 1
    server.root = tmp_path
    built = first(tmp_path / "built", n=4)
    assert first(server.url("www/digits"), n=4) == built == first(server.url("bucket"), n=4)
    code = make_shards.main(["digits", "--resolution", "16", "--limit", "100", "--overwrite",
                             "--out", str(tmp_path / "built"), "--publish", "pipe:false {}"])
    assert code == 2


# ------------------------------------------------------------------ config


class Main:
    """The accelerator's part ShardStream uses, for one process."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        print(*args)


def test_auto_build_never_builds_into_a_remote_source(server, digits16, tmp_path):
    cfg = load_config(None, [*TINY, "data.auto_build=digits", f"data.train={server.url('nowhere')}"])
    with pytest.raises(ConfigError, match="data.auto_build='digits' builds into a local folder"):
        ShardStream(cfg, Main())
    cfg = load_config(None, [*TINY, f"data.train={server.url('digits16')}", "data.train_count=100"])
    with pytest.raises(ConfigError, match="data.train_count=100: only for an explicit shard list"):
        ShardStream(cfg, Main())
    stream = ShardStream(load_config(None, [*TINY, f"data.train={server.url('digits16')}"]), Main())
    assert stream.batches_per_epoch == ShardStream(load_config(None, [*TINY, f"data.train={digits16}"]),
                                                   Main()).batches_per_epoch


def test_a_data_train_override_never_auto_builds(tmp_path):
    """configs/digits.yaml names shards/digits for auto_build; data.train on the command line names
    a folder the user expects to hold shards: an error, not a silent build there."""
    target = tmp_path / "typo"
    cfg = load_config(REPO / "configs/digits.yaml", [f"data.train={target}"])
    assert cfg.data.auto_build == ""
    with pytest.raises(ShardError, match=f"shards folder {target} does not exist"):
        ShardStream(cfg, Main())
    assert not target.exists()
    cfg = load_config(REPO / "configs/digits.yaml", [f"data.train={target}", "data.auto_build=digits"])
    assert cfg.data.auto_build == "digits"  # asked for on the command line too: builds there


# ------------------------------------------------------------------ whole runs on 2 ranks

TWO = {**ENV, "ACCELERATE_USE_CPU": "1"}
STEPS = 12
RUN = ["data.num_workers=1", "checkpoint.every=4", "train.batch_size=16"]


def two_ranks(run, source, *extra):
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            "0", str(REPO / "launch/train.py"), *TINY, *RUN, f"run.dir={run}", f"data.train={source}",
            f"train.max_steps={STEPS}", *extra]


def start(cmd, env=TWO):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, digits16):
    run = tmp_path_factory.mktemp("local") / "run"
    code, _, err = finish(start(two_ranks(run, digits16)), 240)
    assert code == 0, err[-3000:]
    return run


@pytest.mark.slow
def test_two_ranks_from_a_url_through_a_server_restart_equal_the_local_folder(tmp_path, server, local_run):
    """2 ranks x 1 loader worker read over HTTP; the server goes away mid-epoch (after 20 shards)
    and comes back 2 s later: the run retries, finishes, and its weights are bit-identical.
    (Health checks off: their probe would read the test split's shards first and meet the outage
    there instead of in the training stream.)"""
    run = tmp_path / "run"
    proc = start(two_ranks(run, server.url("digits16"), "data.net_backoff=0.5", "health.every=0"))
    server.stop_after(20, restart_after=2.0)
    code, _, err = finish(proc, 240)
    assert code == 0, err[-3000:]
    assert "retrying in" in err and server.url("digits16/train-") in err, err[-3000:]
    same_weights(local_run, run)


@pytest.mark.slow
def test_a_run_killed_while_reading_from_a_url_resumes_bit_exactly_from_a_pipe_template(
        tmp_path, server, digits16, local_run):
    """SIGKILL while the run reads over HTTP (the server holds its requests from the 29th shard
    on, after a checkpoint); the resumed run reads the same shards through `pipe:cat {}` and ends
    bit-identical to the local run: resume and every source give the same data order. (Health
    checks off over HTTP: their probe's test-shard reads would count towards the 28.)"""
    run = tmp_path / "run"
    server.hold_after = 28  # the run stalls around step 8, after a checkpoint
    proc = start(two_ranks(run, server.url("digits16"), "health.every=0"))
    deadline = time.monotonic() + 180
    while not complete_checkpoints(run) or server.tar_gets <= 28:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    # The ranks may run in process groups of their own (torch elastic): kill every process of
    # this run folder, as a node failure would.
    for line in subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(line), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    killed_at = step_of(complete_checkpoints(run)[-1])
    assert 0 < killed_at < STEPS and not (run / "model").exists()
    server.release()
    code, out, err = finish(start(two_ranks(run, f"pipe:cat {digits16}/{{}}")), 240)
    assert code == 0, err[-3000:]
    assert f"at step {killed_at}" in out + err
    same_weights(local_run, run)


@pytest.mark.process
def test_a_server_gone_for_good_is_a_named_error_within_the_retry_budget(tmp_path, server):
    """One process, one loader worker: the server stops after 14 shards and never comes back.
    (Health checks off: their probe reads the test split's 16 small shards first, which would use
    up the server's 14 before training starts.)"""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch/train.py"), *TINY, *RUN, f"run.dir={run}",
           f"data.train={server.url('digits16')}", f"train.max_steps={STEPS}", "data.net_retries=2",
           "data.net_backoff=0.2", "checkpoint.every=2", "health.every=0"]
    proc = start(cmd, ENV)
    server.stop_after(14, restart_after=None)
    code, out, err = finish(proc, timeout=120)
    assert code != 0 and time.monotonic() - server.stopped_at < 30  # retries: 0.2 s + 0.4 s
    assert f"shard {server.url('digits16/train-')}" in err and "could not be read after 3 tries" in err, \
        err[-3000:]
    assert err.count("retrying in") >= 2 and "Traceback" not in err, err[-3000:]
    last = complete_checkpoints(run)[-1]
    assert step_of(last) >= 2 and verify(last) and not (run / "model").exists()


@pytest.mark.process
def test_a_404_fails_before_the_first_step_naming_the_url(tmp_path, server):
    run = tmp_path / "run"
    url = server.url("digits16-typo")
    cmd = [sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={run}", f"data.train={url}",
           "train.max_steps=2"]
    code, out, err = finish(start(cmd, ENV), timeout=120)
    assert code != 0
    assert f"{url}/meta.json: HTTP 404" in err, err[-2000:]
    assert not complete_checkpoints(run) and not (run / "model").exists()


@pytest.mark.process
def test_a_dripping_server_and_a_hung_command_are_bounded_by_the_file_deadline(server, digits16):
    """data.net_timeout bounds each wait for bytes, so a server that sends one byte every 0.2 s
    never trips it; data.net_shard_timeout bounds the whole file. A pipe: command that never
    exits is killed with its children at the same deadline."""
    name = split_info(digits16, "train")[1][0].name
    server.faults[f"/digits16/{name}"] = ["drip"] * 2
    start = time.perf_counter()
    with pytest.raises(ShardError, match=rf"shard {server.url('digits16/' + name)}: could not be read after 2 tries "
                                         r"\(data.net_retries=1\): not read within 1 s \(data.net_shard_timeout; \d+ bytes so far\)"):
        remote_read(server.url(f"digits16/{name}"), NetOptions(retries=1, backoff=0.05, timeout=10, file_timeout=1))
    assert time.perf_counter() - start < 5
    marker = f"{random.random():.9f}"  # a sleep only this test starts
    start = time.perf_counter()
    with pytest.raises(ShardError, match=r"could not be read after 1 try \(data.net_retries=0\): the command did not "
                                         r"finish within 1 s \(data.net_shard_timeout\); killed"):
        remote_read(f"pipe:sleep 3{marker} | cat", NetOptions(retries=0, file_timeout=1))
    assert time.perf_counter() - start < 5
    left = subprocess.run(["pgrep", "-f", f"sleep 3{marker}"], capture_output=True, text=True).stdout
    assert not left.strip(), "the command's children outlived it"
    with pytest.raises(ShardError, match=r"the command exited with status 3"):
        remote_read("pipe:exit 3", NetOptions(retries=0))


def remote_read(url, net):
    from bidvl.data import remote

    return remote.read_bytes(url, net)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.process
def test_a_stop_while_the_data_is_stalled_checkpoints_within_seconds(tmp_path, server, digits16, workers):
    """SIGTERM while the loader waits on a server that drips bytes (one process): the run does not
    wait for the data; it checkpoints the last step and exits 0 within seconds, and a resume from
    that checkpoint on the local folder ends normally."""
    run = tmp_path / "run"
    server.drip_after = 24
    cmd = [sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={run}", f"data.train={server.url('digits16')}",
           f"data.num_workers={workers}", "train.max_steps=1000", "checkpoint.every=1000", "health.every=0"]
    proc = start(cmd, env=ENV)
    deadline = time.monotonic() + 120
    while server.tar_gets <= 24:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(2.0)  # the loader now waits on the drip (a shard takes minutes)
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, 60)
    assert code == 0, err[-3000:]
    assert time.monotonic() - sent < 15
    assert "while waiting for data: checkpointing at step" in out + err
    saved = complete_checkpoints(run)
    assert len(saved) == 1 and step_of(saved[0]) > 0 and verify(saved[0])
    assert f"training stopped by signal {signal.SIGTERM.value} while waiting for data at step {step_of(saved[0])}" in out + err
    code, out, err = finish(start([*cmd[:-4], f"data.train={digits16}", f"train.max_steps={step_of(saved[0]) + 2}",
                                   "health.every=0"], env=ENV), 120)
    assert code == 0, err[-3000:]
    assert f"resumed from {saved[0]}" in out + err


@pytest.mark.slow
def test_two_ranks_stopped_while_the_data_is_stalled_exit_within_the_wait(tmp_path, server):
    """Two processes, the server drips: SIGTERM to every process of the run (as SLURM sends it) ends
    the run within train.stop_wait_s and a few seconds, exit 2, each stalled rank saying that it
    exits without a checkpoint (a checkpoint needs every rank at the same step)."""
    run = tmp_path / "run"
    server.drip_after = 24
    proc = start(two_ranks(run, server.url("digits16"), "health.every=0", "train.stop_wait_s=2",
                           "train.max_steps=1000"))
    deadline = time.monotonic() + 120
    while server.tar_gets <= 24:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(2.0)
    sent = time.monotonic()
    for line in subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(line), signal.SIGTERM)
        except ProcessLookupError:
            pass
    code, out, err = finish(proc, 90)
    assert code != 0 and time.monotonic() - sent < 30, (code, time.monotonic() - sent)
    assert "waited for data, and no data came within train.stop_wait_s=2 s: exiting without a checkpoint" in err
