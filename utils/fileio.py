"""Files that hold weights: atomic writes, loads that never run code, and URLs.

* a write goes to a temporary file in the same folder that replaces the target only once complete and synced, so
  a crash or a full disk never leaves a truncated checkpoint behind (:func:`save_file_atomic`);
* every load is ``torch.load(weights_only=True)``: tensors and plain data only. Official checkpoints pickle their
  yacs ``CfgNode`` under 'config'; it is read as plain data through an allow-list entry and turned back into a
  CfgNode, so no code from the file ever runs (:func:`load_file_safe`); ``.safetensors`` files read alike;
* a URL (as the official MODEL.RESUME allows) is downloaded once into torch.hub's cache (:func:`local_path`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import uuid
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from utils.errors import UserError

__all__ = ['save_file_atomic', 'fsync_dir', 'load_file_safe', 'load_safetensors', 'local_path']

_URL_PREFIXES = ('http://', 'https://', 'file://')


def fsync_dir(folder: str) -> None:
    """Make the rename durable; not possible on every platform (Windows), where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure the previous file at ``path`` is untouched and the temporary file is removed; an
    OSError (disk full, permissions) becomes a UserError naming the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        # os.open with 0o666 lets the umask decide the mode, as a plain open() would.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{path}: could not write checkpoint: {e.strerror or e}") from None
        raise
    fsync_dir(folder)


def _allow_official_config():
    # weights_only refuses dict subclasses such as CfgNode even when allow-listed, so the pickle's
    # reference to yacs.config.CfgNode is mapped to OrderedDict: same items, no code from yacs runs.
    return torch.serialization.safe_globals([(OrderedDict, 'yacs.config.CfgNode')])


def _looks_like_torch_file(path: str) -> bool:
    """A torch.save zip archive, or a legacy torch.save file (a pickle: first byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        return f.read(1) == b'\x80'


def _refusal_reason(err: Exception) -> str:
    """The one informative line of torch's weights_only error text."""
    boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation',
                   '(1)', '(2)', 'In PyTorch 2.6')
    for line in str(err).splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            line = line.replace('WeightsUnpickler error:', '').strip()
            return line.split(' Please use')[0] if line else 'unsupported content'
    return 'unsupported content'


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _as_config(record: Any) -> Any:
    """An official checkpoint's config (read as nested OrderedDicts) as a yacs CfgNode again."""
    if not isinstance(record, OrderedDict) or '__immutable__' not in vars(record):
        return record
    from yacs.config import CfgNode

    def plain(node):
        return {k: plain(v) for k, v in node.items()} if isinstance(node, dict) else node
    try:
        return CfgNode(plain(record))
    except Exception:  # yacs rejects some value types: keep the plain data then
        return plain(record)


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def load_safetensors(path: str) -> dict:
    """A ``.safetensors`` file as a weights-only checkpoint: ``{'model': tensors}``, plus ``'config'`` (YAML text)
    where the file's metadata holds one (our exports do). Nothing in such a file can run code."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file: {_first_line(e)}") from None
    ckpt: dict = {'model': state}
    if metadata.get('config'):
        ckpt['config'] = metadata['config']
    return ckpt


def load_file_safe(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint dict on the CPU without running any code from it; UserError naming ``path`` if not.

    A ``.safetensors`` file reads as ``{'model': ..., 'config': ...}`` (see :func:`load_safetensors`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    if path.endswith('.safetensors') or _is_safetensors(path):
        return load_safetensors(path)
    if not _looks_like_torch_file(path):
        raise UserError(f"{path}: not a PyTorch checkpoint (truncated, or not written by torch.save)")
    try:
        with _allow_official_config():
            obj = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            raise UserError(f"{path}: refused to load: {_refusal_reason(e)} "
                            "(only tensors and plain data are loaded, nothing that runs code)") from None
        raise UserError(f"{path}: not a readable checkpoint: {_first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable checkpoint: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    if 'config' in obj:
        obj['config'] = _as_config(obj['config'])
    return obj


def local_path(path: str) -> str:
    """A URL (as the official MODEL.RESUME allows) is downloaded once into torch.hub's cache."""
    if not path.startswith(_URL_PREFIXES):
        return path
    target = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(path.split('?')[0]))
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            torch.hub.download_url_to_file(path, target, progress=False)
        except Exception as e:
            raise UserError(f"{path}: download failed: {e}") from None
    return target
