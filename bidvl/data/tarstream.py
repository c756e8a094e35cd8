"""Reading samples out of WebDataset tar shards, fast.

Python's `tarfile` (which webdataset's tar iterator wraps) costs about as much per member as
decoding a 32 px PNG, which halved the reader's throughput (docs/benchmarks.md). Shards are plain
POSIX tars, so this module parses the 512-byte headers itself from a memory map: ustar and GNU
headers, GNU long names ('L') and pax path records ('x'); other entry types (directories, links,
global pax headers) are skipped. Every header checksum is verified; a truncated or corrupt shard
is a ShardError naming the shard and the offending member.

Samples follow the WebDataset convention: consecutive members whose names share the part before
the first '.' of the basename form one sample {"__key__", "__url__", ext: bytes, ...}.
"""

from __future__ import annotations

import mmap
from typing import Iterator

from .meta import ShardError

BLOCK = 512


def _octal(field: bytes, shard: str, where: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"shard {shard}: corrupt tar header at {where} (numeric field {field!r})") from None


def _pax_path(data: bytes) -> str | None:
    path, pos = None, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def tar_members(shard: str) -> Iterator[tuple[str, bytes]]:
    """(member name, content) of every regular file of one tar shard, in order."""
    try:
        f = open(shard, "rb")
    except OSError as exc:
        raise ShardError(f"shard {shard}: cannot open ({exc.strerror})") from None
    with f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise ShardError(f"shard {shard}: empty file, expected a tar archive") from None
        with data:
            yield from _parse(data, shard)


def _parse(data, shard: str) -> Iterator[tuple[str, bytes]]:
    pos, end = 0, len(data)
    long_name = None
    last = "start of archive"
    while True:
        if pos + BLOCK > end:
            raise ShardError(f"shard {shard}: truncated after {last} (no end-of-archive marker)")
        header = data[pos: pos + BLOCK]
        if header.count(0) == BLOCK:
            return  # end-of-archive
        stored = _octal(header[148:156], shard, f"member after {last}")
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"shard {shard}: corrupt tar header after {last} (checksum mismatch)")
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size = _octal(header[124:136], shard, name)
        kind = header[156:157]
        start = pos + BLOCK
        pos = start + (size + BLOCK - 1) // BLOCK * BLOCK
        if start + size > end:
            raise ShardError(f"shard {shard}: member {name} is truncated ({size} bytes announced)")
        if kind == b"L":
            long_name = data[start: start + size].rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":
            long_name = _pax_path(data[start: start + size]) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        last = f"member {name}"
        yield name, data[start: start + size]


def split_name(name: str) -> tuple[str, str]:
    """'dir/train_0000042.png' -> ('dir/train_0000042', 'png') (WebDataset's key/extension rule)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def tar_samples(shard: str) -> Iterator[dict]:
    """Samples of one shard: {"__key__", "__url__", ext: bytes}."""
    sample = None
    for name, content in tar_members(shard):
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


def samples_of(shards) -> Iterator[dict]:
    """Samples of several shards, one after the other (shards may be an infinite iterator)."""
    for shard in shards:
        yield from tar_samples(shard)
