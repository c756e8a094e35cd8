"""Where shards come from: a local folder, a URL of a shards folder, a `pipe:` command template or
an explicit brace-expanded shard list, read with bounded retries.

`data.train` / `data.test` (and evaluate.py's `--ood`) take any of these *sources*:

    shards/digits                                   local folder (memory-mapped, the fast path)
    https://host/shards/digits                      folder URL: URL/meta.json, URL/train-000000.tar, ...
    s3://bucket/shards/digits  gs://...  az://...   the same through fsspec (s3fs, gcsfs, adlfs:
    hf://datasets/user/name/shards                  `pip install 'bidvl[s3]'` for S3; endpoint and
                                                    credentials as their SDKs take them, e.g.
                                                    AWS_ENDPOINT_URL, AWS_PROFILE, instance roles)
    pipe:aws s3 cp s3://bucket/shards/digits/{} -  a command template; {} becomes a file name
                                                    (meta.json, train-000000.tar, ...)
    https://host/shards/digits/train-{000000..000063}.tar   an explicit shard list (braceexpand, as
                                                    webdataset expands its URLs); counts come from
                                                    meta.json beside the shards or data.train_count

http(s) is read with the standard library's urllib rather than webdataset's curl handler: that
handler retries for up to a minute on its own and reports a 404 and a 503 with the same exit
status, while we need a 404 to fail at once and a 5xx or a dropped connection to be retried within
data.net_retries. Object stores and every other scheme go through fsspec (a missing object fails
at once, a missing backend or credentials fail naming what to install or set, anything else is
retried like a dropped connection); a `pipe:` command runs in its own session (`sh -c`), killed
with its children when it outlives the file deadline.

A stalled read cannot hang a run: `data.net_timeout` bounds each connect and each wait for bytes,
and `data.net_shard_timeout` the whole file (a server that drips a byte at a time, a command that
never exits), after which the read counts as failed and is retried like any other.

A remote shard is read whole into memory (one shard per loader worker at a time, at most
meta.MAX_PER_SHARD samples) before any of its samples is used, then parsed by the same strict tar
parser as a local one: a fault mid-shard is retried by fetching the shard again, so a retry can
never yield a sample twice or half a sample, and the data order stays a pure function of
(seed, rank, batch index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import webdataset

from ..io import atomic_path
from .errors import ShardError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
HTTP_SCHEMES = ("http", "https")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class NetOptions:
    """Retries of remote reads (data.net_retries, data.net_backoff, data.net_timeout,
    data.net_shard_timeout): a failed read is tried again `retries` times, waiting backoff,
    2 x backoff, 4 x backoff, ... seconds (each wait at most MAX_WAIT); `timeout` bounds each
    http(s) connect and wait for bytes, `file_timeout` one whole file (http(s), pipe: and
    object stores)."""

    retries: int = 5
    backoff: float = 1.0
    timeout: float = 60.0
    file_timeout: float = 600.0

    @classmethod
    def of(cls, data_cfg) -> "NetOptions":
        return cls(data_cfg.net_retries, data_cfg.net_backoff, data_cfg.net_timeout, data_cfg.net_shard_timeout)

    def waits(self) -> list[float]:
        return [min(MAX_WAIT, self.backoff * 2**i) for i in range(self.retries)]


MAX_WAIT = 60.0
DEFAULT = NetOptions()


class NotFound(ShardError):
    """The source answered that the file does not exist (HTTP 404/410): never retried."""


class _Transient(Exception):
    """A failure worth retrying: dropped connection, timeout, 5xx, a pipe command that failed."""


def is_pipe(source: str) -> bool:
    return str(source).startswith("pipe:")


def is_url(source: str) -> bool:
    return bool(_SCHEME.match(str(source)))


def is_remote(source) -> bool:
    """True for anything not read from the local file system by path."""
    source = str(source)
    return is_pipe(source) or (is_url(source) and not source.startswith("file://"))


def local_path(source: str) -> str:
    """file:///a/b -> /a/b; anything else unchanged."""
    source = str(source)
    return urlparse(source).path if source.startswith("file://") else source


def expand(source: str) -> list[str]:
    """An explicit shard list's members (braceexpand, as webdataset expands its URLs), or [source]
    when it has no {a..b} or {a,b} group (a pipe template's `{}` is not a group)."""
    try:
        return list(braceexpand.braceexpand(str(source)))
    except braceexpand.UnbalancedBracesError as exc:
        raise ShardError(f"{source}: {exc}") from None


def is_list(source: str) -> bool:
    return expand(source) != [str(source)]


def member(folder: str, name: str) -> str:
    """The source of one file of a shards folder: `{}` of a pipe template replaced by the name, or
    the name appended to the folder's path or URL."""
    folder = str(folder)
    if is_pipe(folder):
        if "{}" not in folder:
            raise ShardError(f"{folder}: a pipe: source needs {{}} where the file name goes, e.g. "
                             f"'pipe:aws s3 cp s3://bucket/shards/{{}} -'")
        if not _SAFE_NAME.match(name):  # it goes into a shell command line
            raise ShardError(f"{folder}: file name {name!r} (from meta.json) is not safe to put in a "
                             f"command (letters, digits, '_', '-', '+', '.' only)")
        return folder.replace("{}", name)
    return folder.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The folder of a shard URL or path (where its meta.json is); '' for a pipe command."""
    return "" if is_pipe(url) else url.rsplit("/", 1)[0] if "/" in url else "."


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- reading


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, TimeoutError)


def _http(url: str, action):
    """action() with urllib's errors as ours: 404/410 NotFound, 5xx/408/429 and network errors
    _Transient (retried), any other HTTP status a ShardError naming the URL."""
    try:
        return action()
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise NotFound(f"{url}: HTTP {exc.code} {exc.reason}") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except _NETWORK_ERRORS as exc:  # HTTPError is a URLError: handled above first
        raise _Transient(_why(exc)) from None


CHUNK = 1 << 20


def _read_within(read_chunk, deadline: float, file_timeout: float) -> bytes:
    """read_chunk(CHUNK) until it returns nothing, in chunks so that the file's deadline (a
    time.monotonic() value: file_timeout = data.net_shard_timeout after the read began) is checked
    as bytes trickle in; past it, _Transient (retried)."""
    chunks = []
    while chunk := read_chunk(CHUNK):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise _Transient(f"not read within {file_timeout:g} s (data.net_shard_timeout; "
                             f"{sum(map(len, chunks))} bytes so far)")
    return b"".join(chunks)


def _http_read(url: str, timeout: float, file_timeout: float = DEFAULT.file_timeout) -> bytes:
    def read():
        deadline = time.monotonic() + file_timeout
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = _read_within(response.read1, deadline, file_timeout)
            announced = response.headers.get("Content-Length")
            if announced is not None and len(data) != int(announced):
                raise _Transient(f"connection ended after {len(data)} of {announced} bytes")
            return data

    return _http(url, read)


def _http_check(url: str, timeout: float) -> None:
    request = urllib.request.Request(url, method="HEAD")
    _http(url, lambda: urllib.request.urlopen(request, timeout=timeout).close())


STORE_PACKAGES = {"s3": "s3fs (pip install 'bidvl[s3]')", "s3a": "s3fs (pip install 'bidvl[s3]')",
                  "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def _fsspec_call(url: str, action):
    """action() (an fsspec read or write of `url`) with fsspec's and the stores' errors as ours: a
    missing object NotFound, a missing backend or refused credentials a ShardError saying what to
    install or set (neither retried), anything else _Transient (retried: stores raise many types
    for a dropped connection, a throttle or a timeout)."""
    scheme = urlparse(url).scheme
    try:
        return action()
    except _Transient:
        raise
    except FileNotFoundError:
        raise NotFound(f"{url}: no such object") from None
    except ImportError as exc:  # fsspec: "Install s3fs to access S3"
        package = STORE_PACKAGES.get(scheme, "the fsspec backend for " + scheme)
        raise ShardError(f"{url}: reading {scheme}:// needs {package} ({_why(exc)})") from None
    except ValueError as exc:  # fsspec: "Protocol not known: ..."
        raise ShardError(f"{url}: cannot open ({_why(exc)})") from None
    except PermissionError as exc:
        raise ShardError(f"{url}: access denied ({_why(exc)}); the store's credentials come from its "
                         "SDK's settings (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                         "an instance role; AWS_ENDPOINT_URL for other S3 servers)") from None
    except Exception as exc:  # noqa: BLE001 - connection errors of every store
        raise _Transient(f"{type(exc).__name__}: {_why(exc)}") from None


def _fsspec_read(url: str, file_timeout: float = DEFAULT.file_timeout) -> bytes:
    """The object whole, read in CHUNK blocks (`_read_within`) so that the file's deadline
    (data.net_shard_timeout) is checked between blocks, as for http(s): a store that drips bytes cannot hold a shard for
    longer than the deadline and one block (each block's request has the store client's own
    timeouts)."""
    import fsspec

    def read():
        deadline = time.monotonic() + file_timeout
        with fsspec.open(url, "rb") as f:
            return _read_within(f.read, deadline, file_timeout)

    return _fsspec_call(url, read)


def _pipe_read(url: str, file_timeout: float = DEFAULT.file_timeout) -> bytes:
    """A pipe: command's stdout. It runs in its own session, so that a command outliving
    `file_timeout` is killed with every process it started (a `sleep` in a shell pipeline too)."""
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, start_new_session=True)
    try:
        data, _ = proc.communicate(timeout=file_timeout)
    except subprocess.TimeoutExpired:
        raise _Transient(f"the command did not finish within {file_timeout:g} s "
                         f"(data.net_shard_timeout); killed") from None
    finally:
        if proc.returncode is None:  # timed out, or interrupted (a stop request): end it all
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise _Transient(f"the command exited with status {proc.returncode}")
    return data


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _with_retries(url: str, what: str, action, net: NetOptions):
    waits = net.waits()
    for attempt in range(len(waits) + 1):
        try:
            return action()
        except _Transient as exc:
            if attempt == len(waits):
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                raise ShardError(f"{what} {url}: could not be read after {tries} "
                                 f"(data.net_retries={net.retries}): {exc}") from None
            print(f"warning: {what} {url}: {exc}; retrying in {waits[attempt]:g} s "
                  f"({attempt + 1}/{net.retries})", file=sys.stderr, flush=True)
            time.sleep(waits[attempt])


def read_bytes(url: str, net: NetOptions = DEFAULT, what: str = "shard") -> bytes:
    """The whole content of a remote file; transient failures retried (NetOptions), then a
    ShardError naming the URL; a 404 is a NotFound (a ShardError) at once."""
    if urlparse(url).scheme in HTTP_SCHEMES:
        return _with_retries(url, what, lambda: _http_read(url, net.timeout, net.file_timeout), net)
    if is_pipe(url):
        return _with_retries(url, what, lambda: _pipe_read(url, net.file_timeout), net)
    return _with_retries(url, what, lambda: _fsspec_read(url, net.file_timeout), net)


def check_exists(url: str, net: NetOptions = DEFAULT, what: str = "shard") -> None:
    """Fails (NotFound naming the URL) when an http(s) file or a store's object is missing; pipe
    commands cannot be asked cheaply and are checked by their first read."""
    if urlparse(url).scheme in HTTP_SCHEMES:
        _with_retries(url, what, lambda: _http_check(url, net.timeout), net)
    elif not is_pipe(url):
        import fsspec

        def check():
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise FileNotFoundError(url)

        _with_retries(url, what, lambda: _fsspec_call(url, check), net)



# ---------------------------------------------------------------- publishing


def publish(folder, dest: str) -> list[str]:
    """Copies a shards folder (its meta.json's shards, then meta.json itself, so that a reader
    never sees a meta.json naming a shard not yet there) to `dest`: a local folder, a pipe:
    template with {} for the file name (`pipe:aws s3 cp - s3://bucket/shards/digits/{}`), or a
    URL of a store fsspec writes (`s3://bucket/shards/digits`; each object written whole, as the
    store does). Returns the destinations written, in order."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    names = [s["name"] for info in meta["splits"].values() for s in info["shards"]] + ["meta.json"]
    written = []
    if not is_remote(dest):
        out = Path(local_path(dest))
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() == folder.resolve():
            return []
        for name in names:
            with atomic_path(out / name, mkdir=False) as tmp:
                shutil.copyfile(folder / name, tmp)
            written.append(str(out / name))
        return written
    for name in names:
        target = member(dest, name)
        data = (folder / name).read_bytes()
        if is_pipe(dest):
            try:
                stream = webdataset.gopen(target, "wb")
                stream.write(data)
                stream.close()  # a pipe's exit status is checked here
            except (OSError, ValueError) as exc:
                raise ShardError(f"publishing {folder / name} to {target} failed: {_why(exc)}") from None
        else:
            import fsspec

            def write(target=target, data=data):
                with fsspec.open(target, "wb") as f:
                    f.write(data)

            try:
                _fsspec_call(target, write)
            except (_Transient, ShardError) as exc:
                raise ShardError(f"publishing {folder / name} to {target} failed: {exc}") from None
        written.append(target)
    return written
