"""Bad data on the reader's paths: crafted and fuzzed tar headers (pax 'x' and GNU long-name 'L'
records), and data.on_error=skip's budget when nothing readable is left.

The contract: on any bytes at all, the shard parser either makes progress or raises a ShardError
that names the shard; a stream of nothing but bad data ends with a ShardError within one batch's
worth of attempts and a handful of warning lines. Every check runs under a hard `time_limit`, so a
loop fails the test instead of hanging CI.
"""

import gc
import itertools
import io
import re
import signal
import tarfile
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bidvl.data import ShardError, eval_stream, train_stream
from bidvl.data.meta import shard_name, write_meta
from bidvl.data.reader import FULL_WARNINGS
from bidvl.data.tarstream import MAX_EXTENDED_HEADER, tar_members


@contextmanager
def time_limit(seconds: float):
    """Fails the block with TimeoutError once it has run `seconds` (SIGALRM: main thread only)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the reader loops")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ building tars byte by byte


def header(name: bytes, size: int = 0, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """One ustar header block with a valid checksum; `size_field` replaces the 12-byte size field."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:124] = b"0000644\0" b"0000000\0" b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    return with_checksum(block)


def with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: bytes, payload: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(payload), kind) + payload + bytes(-len(payload) % 512)


def pax(body: bytes) -> bytes:
    return member(b"PaxHeaders/x", body, b"x")


def long_name(name: bytes) -> bytes:
    return member(b"././@LongLink", name + b"\0", b"L")


def archive(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


def members_of(tmp_path, raw: bytes) -> list[tuple[str, bytes]]:
    path = tmp_path / shard_name("train", 0)
    path.write_bytes(raw)
    with time_limit(10):
        return [(name, bytes(content)) for name, content in tar_members(str(path))]


SAMPLE = member(b"s0.png", b"png bytes") + member(b"s0.cls", b"1")


# ------------------------------------------------------------------ crafted headers


def test_well_formed_extended_headers_name_their_member(tmp_path):
    assert members_of(tmp_path, archive(pax(b"16 path=dir/a.b\n"), SAMPLE))[0] == ("dir/a.b", b"png bytes")
    assert members_of(tmp_path, archive(long_name(b"d" * 150 + b"/x.png"), SAMPLE))[0][0] == "d" * 150 + "/x.png"
    # pax headers padded with NULs, and pax headers without a path, are fine
    assert members_of(tmp_path, archive(pax(b"16 path=dir/a.b\n\0\0\0"), SAMPLE))[0][0] == "dir/a.b"
    assert members_of(tmp_path, archive(pax(b"20 mtime=1700000000\n"), SAMPLE))[0][0] == "s0.png"


# Each of these made the parser loop forever (L), raise a plain ValueError that on_error=skip does
# not catch (V), or read a wrong name without a word (W), before it was made strict.
CRAFTED = {
    "pax record of length 0 (L)": (pax(b"0 path=x\n"), "announces 0 bytes"),
    "pax record without a space (V)": (pax(b"12path=x.png\n"), "does not start with '<length> '"),
    "pax record with a non-numeric length (V)": (pax(b"zz path=x.png\n"), "does not start with"),
    "pax record with a negative length (V)": (pax(b"-5 path=x.png\n"), "does not start with"),
    "pax record with a '+' length": (pax(b"+14 path=x.png\n"), "does not start with"),
    "pax record with a 30-digit length": (pax(b"9" * 30 + b" path=x.png\n"), "does not start with"),
    "pax record longer than its header (W)": (pax(b"99 path=x.png\n"), "announces 99 bytes"),
    "pax record shorter than its own length field (V)": (pax(b"3 path=x.png\n"), "announces 3 bytes"),
    "pax record not ending in a newline (W)": (pax(b"14 path=x.png!"), "announces 14 bytes"),
    "pax record without '='": (pax(b"9 pathxx\n"), "announces 9 bytes"),
    "pax record cut by the header's size": (pax(b"14 path=x.png\n20 mtime=17"), "record at byte 14"),
    "pax path that is not UTF-8 (V)": (pax(b"15 path=\xff\xfe.png\n"), r"path b'\\xff\\xfe.png' is not UTF-8"),
    "GNU long name that is not UTF-8": (long_name(b"\xff\xfe.png"), "is not UTF-8"),
    "ustar name that is not UTF-8": (member(b"\xff.png", b"x"), "is not UTF-8"),
    "negative octal size of a directory (L)": (header(b"d/", kind=b"5", size_field=b"-0000001000\0"),
                                               "size field b'-0000001000.*is not a number"),
    "negative octal size of a long name (L)": (header(b"././@LongLink", kind=b"L", size_field=b"-0000001000\0"),
                                               "is not a number"),
    "negative octal size of a pax header (L)": (header(b"PaxHeaders/x", kind=b"x", size_field=b"-0000001000\0"),
                                                "is not a number"),
    "negative base-256 size": (header(b"d/", kind=b"5", size_field=b"\xff" * 12), "is not a number"),
    "size '0o1000'": (header(b"d/", kind=b"5", size_field=b"0o1000\0\0\0\0\0\0"), "is not a number"),
    "size '1_000'": (header(b"d/", kind=b"5", size_field=b"1_000\0\0\0\0\0\0\0"), "is not a number"),
    "base-256 size of 2**88": (header(b"a.png", kind=b"0", size_field=b"\x80" + b"\xff" * 11), "truncated"),
    "base-256 size of a long name": (header(b"././@LongLink", kind=b"L", size_field=b"\x80" + b"\xff" * 11),
                                     "truncated"),
    "long name above MAX_EXTENDED_HEADER": (long_name(b"n" * MAX_EXTENDED_HEADER),
                                            f"at most {MAX_EXTENDED_HEADER} accepted"),
    "checksum that is not a number": (header(b"a.png")[:148] + b"-1\0\0\0\0\0\0" + header(b"a.png")[156:],
                                      "checksum mismatch"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_are_shard_errors_naming_the_shard(tmp_path, case):
    record, message = CRAFTED[case]
    with pytest.raises(ShardError, match=r"^shard \S*train-000000\.tar: .*" + message) as raised:
        members_of(tmp_path, archive(record, SAMPLE))
    assert "offset 0" in str(raised.value)  # where the bad header starts


def test_an_error_after_good_members_names_the_offset_and_the_member_before(tmp_path):
    with pytest.raises(ShardError, match=r"train-000000\.tar: corrupt pax header at offset 2048 "
                                         r"\(after member s0\.cls\)"):
        members_of(tmp_path, archive(SAMPLE, pax(b"0 path=x\n"), SAMPLE))


# ------------------------------------------------------------------ fuzzing


FUZZ = settings(max_examples=150, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NAMES = st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60),
                 min_size=1, max_size=4).map("/".join)


def tarfile_bytes(names: list[str], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 100 * i
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "x" * (7 * i)}
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    return buf.getvalue()


def extended_records(raw: bytes) -> list[tuple[int, int]]:
    """(header offset, end of body) of every 'x' and 'L' record of an intact tar."""
    records, pos = [], 0
    while raw[pos: pos + 512].strip(b"\0"):
        size = int(raw[pos + 124: pos + 136].strip(b"\0 ") or b"0", 8)
        if raw[pos + 156: pos + 157] in (b"x", b"L"):
            records.append((pos, pos + 512 + size))
        pos += 512 + (size + 511) // 512 * 512
    return records


def check_members_or_shard_error(tmp_path, raw: bytes) -> None:
    try:
        for name, content in members_of(tmp_path, raw):
            assert isinstance(name, str) and isinstance(content, bytes)
    except ShardError as exc:
        assert re.match(r"shard \S*train-000000\.tar: ", str(exc)), exc


# What a size field may hold: octal, base-256 (either sign), what int() takes but tar does not,
# and any 12 bytes.
SIZE_FIELDS = st.one_of(
    st.integers(0, 8 ** 11 - 1).map(lambda n: b"%011o\0" % n),
    st.integers(1, 8 ** 10).map(lambda n: b"-%010o\0" % n),
    st.integers(0, 2 ** 88 - 1).map(lambda n: b"\x80" + n.to_bytes(11, "big")),
    st.binary(min_size=11, max_size=11).map(lambda b: b"\xff" + b),
    st.sampled_from([b"+0000001000\0", b"0o000001000\0", b"1_000\0\0\0\0\0\0\0", b" " * 12, b"\0" * 12]),
    st.binary(min_size=12, max_size=12),
)
INTERESTING_BYTES = st.sampled_from(b"0129 =\n\0-+\x80\xff")


@FUZZ
@given(names=st.lists(NAMES, min_size=1, max_size=4), data=st.data())
def test_fuzz_mangled_pax_and_long_name_records_give_members_or_shard_errors(tmp_path, names, data):
    fmt = data.draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    names = [n + "/" + "long" * 30 + f".{i}" for i, n in enumerate(names)]  # > 100 bytes: 'x' or 'L'
    raw = bytearray(tarfile_bytes(names, fmt))
    records = extended_records(raw)
    assert records
    for _ in range(data.draw(st.integers(0, 8))):
        start, end = data.draw(st.sampled_from(records))
        raw[data.draw(st.integers(start, end - 1))] = data.draw(INTERESTING_BYTES | st.integers(0, 255))
    if data.draw(st.booleans()):
        start, _ = data.draw(st.sampled_from(records))
        raw[start + 124: start + 136] = data.draw(SIZE_FIELDS)
    if data.draw(st.booleans()):  # past the checksum, into the size and body checks
        for start, _ in records:
            raw[start: start + 512] = with_checksum(raw[start: start + 512])
    check_members_or_shard_error(tmp_path, bytes(raw))


@settings(FUZZ, max_examples=50)
@given(names=st.lists(NAMES, min_size=1, max_size=4), fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_intact_pax_and_long_names_read_like_tarfile(tmp_path, names, fmt):
    raw = tarfile_bytes(names, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, m.size) for m in tar]
    assert [(name, len(content)) for name, content in members_of(tmp_path, raw)] == expected


PAX_KEYS = st.sampled_from([b"path", b"comment", b"mtime", b"size", b"", b"path=", b"p a t h"])


@st.composite
def pax_bodies(draw):
    """Records whose lengths are right or off by a little, between runs of random bytes."""
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        rest = b" " + draw(PAX_KEYS | st.binary(max_size=6)) + b"=" + draw(st.binary(max_size=30)) + b"\n"
        length = len(rest) + len(str(len(rest) + 2))
        length += draw(st.sampled_from([0, 0, 0, -1, 1, -length, 2 ** 64]))
        body += str(length).encode() + rest
        if draw(st.booleans()):
            body += draw(st.binary(max_size=8))
    return body


@FUZZ
@given(body=st.one_of(pax_bodies(), st.binary(max_size=300)), kind=st.sampled_from([b"x", b"L"]))
def test_fuzz_random_extended_header_bodies_give_members_or_shard_errors(tmp_path, body, kind):
    check_members_or_shard_error(tmp_path, archive(member(b"ext", body, kind), SAMPLE))


def png(shape=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder, shards: list[list[tuple[str, bytes]]], fmt=tarfile.PAX_FORMAT):
    """One tar per list of (member name, payload); meta.json counts samples by key."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for k, members in enumerate(shards):
        with tarfile.open(folder / shard_name("train", k), "w", format=fmt) as tar:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        count = len({name.rsplit(".", 1)[0] for name, _ in members}) or 1
        listed.append({"name": shard_name("train", k), "count": count})
    write_meta(folder, {"source": "test", "resolution": 8, "channels": 1, "num_classes": None, "options": {},
                        "splits": {"train": {"count": sum(s["count"] for s in listed), "shards": listed}}})
    return folder


@settings(FUZZ, max_examples=30, deadline=timedelta(seconds=5))
@given(data=st.data())
def test_fuzz_mangled_long_names_through_the_reader_give_batches_or_shard_errors(tmp_path, data):
    """End to end: eval (raise) and train (skip, budget 3) streams on a shard whose long-name
    records were mangled: full batches, or a ShardError, in bounded time."""
    fmt = data.draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    folder = write_shards(tmp_path / "s", [[("d" * 120 + f"/s{i}.png", png()) for i in range(6)]], fmt)
    path = folder / shard_name("train", 0)
    raw = bytearray(path.read_bytes())
    records = extended_records(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        start, end = data.draw(st.sampled_from(records))
        raw[data.draw(st.integers(start, end - 1))] = data.draw(INTERESTING_BYTES | st.integers(0, 255))
    if data.draw(st.booleans()):
        for start, _ in records:
            raw[start: start + 512] = with_checksum(raw[start: start + 512])
    path.write_bytes(bytes(raw))
    with time_limit(20):
        try:
            for images, _, _ in eval_stream(folder, "train", batch_size=4):
                assert images.shape == (4, 1, 8, 8)
        except ShardError as exc:
            assert "train-000000.tar" in str(exc)
        stream = iter(train_stream(folder, "train", batch_size=2, seed=0, on_error="skip", max_skipped=3))
        try:
            for _ in range(5):
                assert next(stream)[0].shape == (2, 1, 8, 8)
        except ShardError as exc:
            assert re.search(r"more than data.max_skipped=3 .*train-000000\.tar", str(exc)), exc


# ------------------------------------------------------------------ on_error=skip's budget


def warning_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]


def first_batch_error(folder, num_workers, max_skipped) -> str:
    """The ShardError message that `next()` of a skip-mode train stream raises (within 60 s).
    From a loader worker it is the worker's own one-line message, torch's wrapped error (the
    worker's traceback) kept as its cause."""
    with time_limit(60):
        batches = iter(train_stream(folder, "train", batch_size=4, seed=0, num_workers=num_workers,
                                    on_error="skip", max_skipped=max_skipped))
        with pytest.raises(ShardError) as raised:
            next(batches)
        message = str(raised.value)
        cause = raised.value.__cause__
        if num_workers:
            assert isinstance(cause, ShardError)
            assert str(cause).startswith(f"Caught {type(raised.value).__name__} in DataLoader worker process 0")
            assert str(cause).rstrip().endswith(message)
        del raised, batches, cause  # shuts the loader's worker down here, inside the time limit
        gc.collect()
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.process
def test_a_shard_of_only_bad_samples_stops_within_one_batch(tmp_path, capfd, num_workers):
    samples = [(f"s{i:04d}.png", b"\x89PNG\r\n\x1a\n not really") for i in range(500)]
    folder = write_shards(tmp_path / "s", [samples])
    message = first_batch_error(folder, num_workers, max_skipped=20)
    # A loader worker's error reaches the main process with the same one line as with num_workers=0.
    assert re.search(r"more than data.max_skipped=20 bad samples or shards skipped while assembling one "
                     r"batch \(data.on_error=skip\); the last: shard \S*train-000000\.tar, sample s\d{4}: "
                     r"member .png is not a readable image", message), message
    lines = warning_lines(capfd)
    assert 1 <= len(lines) <= FULL_WARNINGS + 2  # 5 in full, then at the 8th and 16th
    assert all("train-000000.tar" in line for line in lines)
    assert "16 bad samples or shards skipped so far" in lines[-1]


@pytest.mark.parametrize("fault, num_workers", [("truncated", 0), ("truncated", 1), ("empty", 0)])
@pytest.mark.process
def test_a_stream_whose_every_shard_is_unreadable_stops(tmp_path, capfd, fault, num_workers):
    folder = write_shards(tmp_path / "s", [[(f"s{k}{i}.png", png()) for i in range(4)] for k in range(3)])
    for k in range(3):
        path = folder / shard_name("train", k)
        path.write_bytes(path.read_bytes()[:700] if fault == "truncated" else bytes(10240))
    message = first_batch_error(folder, num_workers, max_skipped=5)
    reason = "truncated" if fault == "truncated" else "holds no samples"
    assert re.search(r"more than data.max_skipped=5 bad samples or shards skipped .*the last: shard "
                     r"\S*train-00000\d\.tar.*" + reason, message), message
    assert message.count("data.max_skipped") == 1, message  # (it nested itself: "the last: more than ...")
    assert len(warning_lines(capfd)) <= FULL_WARNINGS


def test_skipped_counts_still_come_with_batches_and_warnings_are_rate_limited(tmp_path, capfd):
    samples = [(f"s{i:04d}.png", png() if i % 2 else b"not a png") for i in range(64)]
    folder = write_shards(tmp_path / "s", [samples])
    batches = iter(train_stream(folder, "train", batch_size=4, seed=0, on_error="skip", max_skipped=100))
    with time_limit(60):
        skipped = sum(next(batches)[2] for _ in range(100))
    assert skipped > 100  # about one bad sample per good one, counted exactly once each
    lines = warning_lines(capfd)
    summaries = [line for line in lines if "skipped so far" in line]
    assert len(lines) - len(summaries) == FULL_WARNINGS
    assert len(summaries) == skipped.bit_length() - FULL_WARNINGS.bit_length()  # at 8, 16, 32, ...


def test_skip_counts_per_batch_are_exact_and_the_budget_holds_per_batch(tmp_path, capfd):
    """Each batch reports exactly the bad samples skipped since the previous one (checked against
    the role's raw samples decoded one by one), and max_skipped is the most one batch may skip."""
    samples = [(f"s{i:04d}.png", png() if i % 3 else b"not a png") for i in range(60)]
    folder = write_shards(tmp_path / "s", [samples])
    stream = train_stream(folder, "train", batch_size=4, seed=0, on_error="skip", max_skipped=100)
    raw, decode = stream.dataset._epoch_samples(0, 0), stream.dataset.decoder
    expected = []
    for _ in range(10):
        good = bad = 0
        while good < 4:
            try:
                decode(next(raw))
                good += 1
            except ShardError:
                bad += 1
        expected.append(bad)
    assert sum(expected) > 10 and len(set(expected)) > 1
    batches = iter(stream)
    with time_limit(60):
        assert [next(batches)[2] for _ in range(10)] == expected
    most = max(expected)
    first_over = expected.index(most)
    batches = iter(train_stream(folder, "train", batch_size=4, seed=0, on_error="skip", max_skipped=most))
    for _ in range(10):
        next(batches)  # no batch skips more than `most`: none stops
    batches = iter(train_stream(folder, "train", batch_size=4, seed=0, on_error="skip", max_skipped=most - 1))
    for _ in range(first_over):
        next(batches)
    with pytest.raises(ShardError, match=rf"^more than data.max_skipped={most - 1} bad samples"):
        next(batches)
    capfd.readouterr()


def test_on_error_raise_stops_at_an_unreadable_shard_without_skipping(tmp_path, capfd):
    folder = write_shards(tmp_path / "s", [[(f"s{i}.png", png()) for i in range(4)]])
    path = folder / shard_name("train", 0)
    path.write_bytes(path.read_bytes()[:700])
    with time_limit(60), pytest.raises(ShardError, match=r"train-000000\.tar"):
        next(iter(train_stream(folder, "train", batch_size=4, seed=0)))
    assert warning_lines(capfd) == []


def test_a_resumed_skip_mode_stream_fast_forwards_past_an_unreadable_shard(tmp_path):
    """The fast-forward of a resume reads raw samples; an unreadable shard met there is counted
    like one met while assembling a batch, and the resumed stream equals the uninterrupted one."""
    shards = [[(f"s{k}{i:02d}.png", png()) for i in range(8)] for k in range(3)]
    folder = write_shards(tmp_path / "s", shards)
    path = folder / shard_name("train", 1)
    path.write_bytes(path.read_bytes()[:700])  # truncated: every read of it fails
    kwargs = dict(batch_size=4, seed=0, on_error="skip", max_skipped=50)
    with time_limit(60):
        full = [b[0] for b in itertools.islice(iter(train_stream(folder, "train", **kwargs)), 5)]
        resumed = [b[0] for b in itertools.islice(iter(train_stream(folder, "train", start_batch=3, **kwargs)), 2)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
