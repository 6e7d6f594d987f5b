"""Where the bytes of shard files come from: local paths, or URLs read with ranged requests.

:func:`storage_for` picks a :class:`Storage` for a path:

* a local path (or ``file://``): ranged reads with ``os.pread`` on descriptors each process opens for itself
  (a few dozen kept open, least recently used closed first: a set may have thousands of shards);
* a URL that `fsspec <https://filesystem-spec.readthedocs.io>`_ opens (``s3://``, ``gs://``, ``http(s)://``,
  ``memory://``, ...): ``cat_file`` with a byte range, ``open`` for the readers that seek (tar headers, Parquet
  footers). fsspec is optional: without it a URL is one ``UserError`` saying to install it;
* ``http(s)://`` when fsspec's HTTP backend cannot load (it needs aiohttp): a small reader of our own on urllib
  with ``Range`` requests (a server that ignores ``Range`` is an error, never a silent full download).

HTTP cannot list a folder, so for ``http(s)://`` the shards are named (a list or a brace pattern) or come from
the set's ``_info.json``; other storages list. Every storage object is picklable and holds no open handle in its
state, so loader workers (forked or spawned) open their own.
"""
from __future__ import annotations

import glob
import io
import os
import re
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import BinaryIO, Optional

from utils.errors import UserError

_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
_BRACE = re.compile(r'\{([^{}]*)\}')


def is_url(path: str) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    match = _SCHEME.match(path)
    return bool(match) and match.group(1).lower() != 'file'


def _local(path: str) -> str:
    return path[len('file://'):] if path.lower().startswith('file://') else path


def join(root: str, name: str) -> str:
    """``name`` under ``root`` (a folder or a URL), unless ``name`` is absolute or a URL itself."""
    if _SCHEME.match(name) or os.path.isabs(name):
        return name
    if is_url(root):
        return root.rstrip('/') + '/' + name.lstrip('/')
    return os.path.join(_local(root), name)


def basename(path: str) -> str:
    return path.rstrip('/').rsplit('/', 1)[-1]


def expand_braces(pattern: str) -> list[str]:
    """``'a-{000..002}.tar'`` -> ``['a-000.tar', 'a-001.tar', 'a-002.tar']``; ``'{x,y}'`` lists alternatives.

    Numeric ranges keep the width of their first bound when it is zero-padded (webdataset's braceexpand does).
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    bounds = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if bounds:
        first, last = bounds.groups()
        width = len(first) if first.startswith('0') or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(',')
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


class Storage:
    """What the shard readers need from a place that holds files. ``signature`` is ``(size, version)`` where
    version is a modification time or an ETag: a cached index is valid while both are unchanged."""

    can_list = True

    def isdir(self, path: str) -> bool:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        """Sorted names (not paths) of the entries of the folder ``path``."""
        raise NotImplementedError

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths matching a glob pattern."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def signature(self, path: str) -> tuple[int, str]:
        raise NotImplementedError

    def read(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``path`` from ``offset``; fewer only at the end of the file."""
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        """A seekable binary file object (for tar headers and Parquet footers)."""
        raise NotImplementedError

    def read_all(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.read()


class LocalStorage(Storage):
    """Local files; descriptors are opened per process (those inherited through ``fork`` are never used)."""

    MAX_OPEN = 64
    _fds: 'OrderedDict[tuple[int, str], int]' = OrderedDict()

    def isdir(self, path: str) -> bool:
        return os.path.isdir(_local(path))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(_local(path)))

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(_local(pattern)))

    def exists(self, path: str) -> bool:
        return os.path.exists(_local(path))

    def signature(self, path: str) -> tuple[int, str]:
        st = os.stat(_local(path))
        return st.st_size, str(st.st_mtime_ns)

    def _fd(self, path: str) -> int:
        key = (os.getpid(), path)
        fds = LocalStorage._fds
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            return fd
        for stale in [k for k in fds if k[0] != key[0]]:
            del fds[stale]  # a parent's descriptors: never closed here, the parent still uses them
        while len(fds) >= self.MAX_OPEN:
            os.close(fds.popitem(last=False)[1])
        fd = fds[key] = os.open(_local(path), os.O_RDONLY)
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        return os.pread(self._fd(path), size, offset)

    def open(self, path: str) -> BinaryIO:
        return open(_local(path), 'rb')


def _version(info: dict) -> str:
    for key in ('mtime', 'LastModified', 'Last-Modified', 'last_modified', 'updated', 'ETag', 'etag', 'created'):
        if info.get(key) is not None:
            return str(info[key])
    return ''


class FsspecStorage(Storage):
    """Any URL fsspec opens, through the filesystem object it returns for the URL's scheme."""

    def __init__(self, url: str):
        import fsspec
        self.fs = fsspec.core.url_to_fs(url)[0]
        self.protocol = _SCHEME.match(url).group(1)
        self.can_list = not self.protocol.lower().startswith('http')

    def _url(self, path: str) -> str:
        return path if _SCHEME.match(path) else f'{self.protocol}://{path.lstrip("/")}'

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(basename(p) for p in self.fs.ls(path, detail=False))

    def glob(self, pattern: str) -> list[str]:
        return sorted(self._url(p) for p in self.fs.glob(pattern))

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def signature(self, path: str) -> tuple[int, str]:
        info = self.fs.info(path)
        return int(info['size']), _version(info)

    def read(self, path: str, offset: int, size: int) -> bytes:
        return self.fs.cat_file(path, start=offset, end=offset + size)

    def open(self, path: str) -> BinaryIO:
        return self.fs.open(path, 'rb')


class HttpStorage(Storage):
    """``http(s)://`` over urllib with ``Range`` requests (used when fsspec's HTTP backend is unavailable)."""

    can_list = False
    ATTEMPTS = 3
    TIMEOUT = 60.0

    def isdir(self, path: str) -> bool:
        return False

    def listdir(self, path: str) -> list[str]:
        raise UserError(f'cannot list {path}: HTTP has no folder listing (name the shards: DATA.TRAIN_SHARDS, '
                        'DATA.VAL_SHARDS)')

    glob = listdir

    def _request(self, path: str, method: str = 'GET', headers: Optional[dict] = None):
        for attempt in range(self.ATTEMPTS):
            try:
                request = urllib.request.Request(path, method=method, headers=headers or {})
                return urllib.request.urlopen(request, timeout=self.TIMEOUT)
            except urllib.error.HTTPError:
                raise
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt == self.ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * 2 ** attempt)  # a busy server or a dropped connection: try again
        raise AssertionError('unreachable')

    def exists(self, path: str) -> bool:
        try:
            with self._request(path, 'HEAD'):
                return True
        except urllib.error.HTTPError:
            return False

    def signature(self, path: str) -> tuple[int, str]:
        with self._request(path, 'HEAD') as response:
            size = response.headers.get('Content-Length')
            if size is None:
                raise OSError(f'{path}: the server gives no Content-Length')
            return int(size), response.headers.get('ETag') or response.headers.get('Last-Modified') or ''

    def read(self, path: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b''
        with self._request(path, headers={'Range': f'bytes={offset}-{offset + size - 1}'}) as response:
            if response.status != 206:
                raise OSError(f'{path}: the server ignores Range requests (answered {response.status})')
            return response.read()

    def read_all(self, path: str) -> bytes:
        with self._request(path) as response:
            return response.read()

    def open(self, path: str) -> BinaryIO:
        return io.BufferedReader(_RangeFile(self, path), buffer_size=1 << 20)


class _RangeFile(io.RawIOBase):
    """A read-only seekable file over ranged reads (``io.BufferedReader`` adds the read-ahead)."""

    def __init__(self, storage: HttpStorage, path: str):
        super().__init__()
        self.storage, self.path, self.pos = storage, path, 0
        self.size = storage.signature(path)[0]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self.size - self.pos)
        if size <= 0:
            return 0
        data = self.storage.read(self.path, self.pos, size)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def storage_for(path: str) -> Storage:
    """The storage that reads ``path`` (see the module docstring)."""
    if not is_url(path):
        return LocalStorage()
    scheme = _SCHEME.match(path).group(1).lower()
    try:
        import fsspec  # noqa: F401  (only whether it is installed)
    except ImportError:
        if scheme in ('http', 'https'):
            return HttpStorage()
        raise UserError(f'{path} is a URL: reading it needs the fsspec package (pip install fsspec, '
                        f'plus its {scheme} backend, e.g. s3fs for s3://)') from None
    try:
        return FsspecStorage(path)
    except ImportError as err:
        if scheme in ('http', 'https'):
            return HttpStorage()  # fsspec's HTTP backend needs aiohttp; urllib does without
        raise UserError(f'{path}: fsspec has no usable backend for {scheme}:// ({err})') from None
    except ValueError as err:
        raise UserError(f'{path}: fsspec cannot open {scheme}:// ({err})') from None


def has_wildcards(pattern: str) -> bool:
    """True when ``pattern`` is a glob (``*``, ``?``, ``[...]``)."""
    return any(ch in pattern for ch in '*?[')
