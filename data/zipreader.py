"""Reading members of zip archives by ``'<archive>.zip@/<member>'`` paths (the official zip layout).

Each process keeps its own open ``ZipFile`` per archive. A handle opened before ``fork`` must not be
used by loader workers: forked processes share the file descriptor's offset, so concurrent reads
through one handle would interleave and return the wrong bytes. Handles are therefore keyed by
process id and reopened lazily in every worker.
"""
from __future__ import annotations

import os
import zipfile

ZIP_MARK = '.zip@'


def split_zip_path(path: str) -> tuple[str, str]:
    """``'/d/train.zip@/a/b.jpg'`` -> ``('/d/train.zip', 'a/b.jpg')``."""
    at = path.index(ZIP_MARK) + len(ZIP_MARK) - 1
    return path[:at], path[at + 1:].strip('/')


class ZipReader:
    """Per-process cache of open archives; all methods are static so datasets stay picklable."""

    _handles: dict[tuple[int, str], zipfile.ZipFile] = {}

    @staticmethod
    def archive(zip_path: str) -> zipfile.ZipFile:
        """The open archive for this process (opened on first use after a fork)."""
        key = (os.getpid(), zip_path)
        handle = ZipReader._handles.get(key)
        if handle is None:
            # Drop handles inherited from a parent process; they are unsafe to share (see module doc).
            for stale in [k for k in ZipReader._handles if k[0] != key[0]]:
                del ZipReader._handles[stale]
            handle = ZipReader._handles[key] = zipfile.ZipFile(zip_path, 'r')
        return handle

    @staticmethod
    def read(path: str) -> bytes:
        """The bytes of one member, given an ``archive.zip@/member`` path."""
        zip_path, member = split_zip_path(path)
        return ZipReader.archive(zip_path).read(member)

    @staticmethod
    def read_member(zip_path: str, member: str) -> bytes:
        """The bytes of ``member`` inside the archive at ``zip_path``."""
        return ZipReader.archive(zip_path).read(member)

    @staticmethod
    def member_sizes(zip_path: str) -> dict[str, int]:
        """Uncompressed size of every member, from the central directory (no member is read)."""
        return {info.filename: info.file_size for info in ZipReader.archive(zip_path).infolist()}
