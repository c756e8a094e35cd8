"""Reading samples out of WebDataset tar shards, fast.

Python's `tarfile` (which webdataset's tar iterator wraps) costs about as much per member as
decoding a 32 px PNG, which halved the reader's throughput (docs/benchmarks.md). Shards are plain
POSIX tars, so this module parses the 512-byte headers itself from a memory map: ustar and GNU
headers, GNU long names ('L') and pax path records ('x'); other entry types (directories, links,
global pax headers) are skipped. Every header checksum is verified; a truncated or corrupt shard
is a ShardError naming the shard, the byte offset and the member before it. On any bytes at all the
parser either moves forward or raises ShardError (tests/test_data_faults.py fuzzes it): numeric
fields must be octal digits or positive base-256, pax records must be well formed, and long names
and pax headers are at most MAX_EXTENDED_HEADER bytes.

Remote shards (bidvl.data.remote) are read whole into memory and parsed by the same code, so every
check and every error message is the same for every source; the error names the URL or command.

Samples follow the WebDataset convention: consecutive members whose names share the part before
the first '.' of the basename form one sample {"__key__", "__url__", ext: bytes, ...}.
"""

from __future__ import annotations

import hashlib
import mmap
from typing import Iterator

from . import remote
from .errors import ShardError

BLOCK = 512
# Largest GNU long name or pax header accepted: real ones hold a path (PATH_MAX is 4096) and a few
# records; anything bigger is a corrupt size field, refused before its bytes are copied.
MAX_EXTENDED_HEADER = 1 << 20


def _number(field: bytes) -> int:
    """A numeric header field: octal digits padded with spaces or NULs, or GNU base-256 (first byte
    0x80). -1 when it is neither: plain `int(text, 8)` would also take '-1000', '+7', '0o7' and
    '1_0', and a negative size moves the parser backwards, into a loop."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if text.translate(None, b"01234567"):
        return -1
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` of a pax extended header, a run of "<length> <key>=<value>\\n" records where
    <length> counts the whole record; trailing NUL padding is allowed. ValueError saying what is
    wrong with a malformed record."""
    data = data.rstrip(b"\0")
    path, pos = None, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ValueError(f"record at byte {pos} does not start with '<length> '")
        length = int(digits)
        record = data[pos: pos + length]
        if length < len(digits) + 3 or len(record) < length or not record.endswith(b"\n") \
                or b"=" not in record:
            raise ValueError(f"record at byte {pos} announces {length} bytes, not a '<key>=<value>\\n' "
                             f"record within the {len(data)}-byte header")
        key, _, value = record[len(digits) + 1: -1].partition(b"=")
        if key == b"path":
            try:  # trailing slashes dropped, as tarfile does for a pax path (a regular member "x/" is "x")
                path = value.decode("utf-8").rstrip("/")
            except UnicodeDecodeError:
                raise ValueError(f"path {value[:200]!r} is not UTF-8") from None
        pos += length
    return path


def _check_digest(data, shard, sha256: str | None) -> None:
    """The shard's bytes against the sha256 its meta.json records (None: nothing to check). On a
    mismatch, a damage the tar parser can name (truncated, a corrupt header) is named as it would
    be without the digest; otherwise (a changed byte inside a member) the digest is the error."""
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            for _ in _parse(data, str(shard), content=False):
                pass
            raise ShardError(f"shard {shard}: its sha256 {got[:16]}... is not the {sha256[:16]}... that meta.json "
                             f"records (corrupted or replaced since it was written)")


def tar_members(shard: str, net=None, content: bool = True, sha256: str | None = None
                ) -> Iterator[tuple[str, bytes | None]]:
    """(member name, content) of every regular file of one tar shard, in order (content None when
    not wanted: a local shard's members are then never copied out of the map). A remote shard
    (URL or pipe: command, see bidvl.data.remote) is read whole, with retries (`net`), then parsed
    the same way. Given `sha256` (meta.json's), the whole shard is checked against it first."""
    if remote.is_remote(shard):
        data = remote.read_bytes(str(shard), net or remote.DEFAULT)
        if not data:
            raise ShardError(f"shard {shard}: empty file, expected a tar archive")
        _check_digest(data, shard, sha256)
        yield from _parse(data, str(shard), content)
        return
    try:
        f = open(shard, "rb")
    except OSError as exc:
        raise ShardError(f"shard {shard}: cannot open ({exc.strerror})") from None
    with f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise ShardError(f"shard {shard}: empty file, expected a tar archive") from None
        except OSError as exc:
            raise ShardError(f"shard {shard}: cannot map ({exc.strerror})") from None
        with data:
            _check_digest(data, shard, sha256)
            yield from _parse(data, shard, content)


def _utf8(name: bytes, shard: str, pos: int, last: str) -> str:
    # Strict: decoding with replacement could give two names the same key and merge their members.
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise ShardError(f"shard {shard}: corrupt tar header at offset {pos} (after {last}): member "
                         f"name {name[:200]!r} is not UTF-8") from None


def _parse(data, shard: str, content: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """Members of a whole tar image. Ends on any bytes: every header moves `pos` forward by at least
    one block (sizes are never negative), or raises a ShardError naming the shard, the header's
    byte offset and the member before it."""
    pos, end = 0, len(data)
    long_name = None
    last = "start of archive"
    while True:
        if pos + BLOCK > end:
            raise ShardError(f"shard {shard}: truncated at offset {pos}, after {last} "
                             f"(no end-of-archive marker)")
        header = data[pos: pos + BLOCK]
        if header.count(0) == BLOCK:
            return  # end-of-archive
        stored = _number(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"shard {shard}: corrupt tar header at offset {pos}, after {last} "
                             f"(checksum mismatch)")
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _number(header[124:136])
        kind = header[156:157]
        start = pos + BLOCK
        if size < 0 or start + size > end:
            member = name.decode("utf-8", "replace")
            if size < 0:
                raise ShardError(f"shard {shard}: corrupt tar header at offset {pos} (member {member}, "
                                 f"after {last}): size field {header[124:136]!r} is not a number")
            raise ShardError(f"shard {shard}: member {member} is truncated ({size} bytes announced at "
                             f"offset {pos}, {end - start} left)")
        if kind in (b"L", b"x"):
            what = "GNU long name" if kind == b"L" else "pax header"
            if size > MAX_EXTENDED_HEADER:
                raise ShardError(f"shard {shard}: corrupt tar header at offset {pos} (after {last}): "
                                 f"{size}-byte {what}, at most {MAX_EXTENDED_HEADER} accepted")
            body = data[start: start + size]
            if kind == b"L":
                long_name = _utf8(body.rstrip(b"\0"), shard, pos, last)
            else:
                try:
                    long_name = _pax_path(body) or long_name
                except ValueError as exc:
                    raise ShardError(f"shard {shard}: corrupt {what} at offset {pos} (after {last}): "
                                     f"{exc}") from None
        elif kind not in (b"0", b"\0", b"7"):
            long_name = None
        else:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = _utf8(name, shard, pos, last)
            last = f"member {name}"
            yield name, (data[start: start + size] if content else None)
        pos = start + (size + BLOCK - 1) // BLOCK * BLOCK


def split_name(name: str) -> tuple[str, str]:
    """'dir/train_0000042.png' -> ('dir/train_0000042', 'png') (WebDataset's key/extension rule)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def tar_samples(shard: str, net=None, sha256: str | None = None) -> Iterator[dict]:
    """Samples of one shard: {"__key__", "__url__", ext: bytes} (`sha256`: see tar_members)."""
    sample = None
    for name, content in tar_members(shard, net, sha256=sha256):
        key, ext = split_name(name)
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": shard}
        if ext in sample:
            raise ShardError(f"shard {shard}: member {name} appears twice in sample {key}")
        sample[ext] = content
    if sample is not None:
        yield sample


def count_samples(shard: str, net=None) -> int:
    """The number of samples of one shard (consecutive members sharing a key), read the way
    `tar_samples` reads it, so a shard that cannot be read fails here naming it. Local shards:
    headers only."""
    count, key = 0, None
    for name, _ in tar_members(shard, net, content=False):
        k, _ = split_name(name)
        if k != key:
            count, key = count + 1, k
    return count
