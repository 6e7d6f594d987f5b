"""HOST_MEMORY_CACHE: glibc's malloc keeps freed memory for reuse instead of mapping large blocks afresh."""
from __future__ import annotations

import subprocess
import sys

import pytest

from config import get_default_config
from utils.host_memory import mmapped_bytes
from conftest import REPO

pytestmark = pytest.mark.skipif(mmapped_bytes() < 0, reason='needs glibc with mallinfo2')

_PROBE = """
import sys, torch
from utils.host_memory import keep_freed_memory, mmapped_bytes
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
before = mmapped_bytes()
x = torch.empty(96 << 20, dtype=torch.uint8)  # above glibc's largest mmap threshold (32 MB)
print(mmapped_bytes() - before)
"""


def _mapped_by_a_large_tensor(mode: str) -> int:
    out = subprocess.run([sys.executable, '-c', _PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_large_blocks_come_from_the_heap_once_freed_memory_is_kept():
    assert _mapped_by_a_large_tensor('default') >= 96 << 20  # the C library's default: a fresh mapping
    assert _mapped_by_a_large_tensor('keep') == 0


def test_the_setting_is_on_by_default():
    assert get_default_config().HOST_MEMORY_CACHE is True


@pytest.mark.parametrize('opts, expected', [([], [True]), (['--opts', 'HOST_MEMORY_CACHE', 'False'], [])])
def test_main_applies_the_setting_before_building_anything(tmp_path, monkeypatch, opts, expected):
    import launch
    import main
    calls = []
    monkeypatch.setattr(launch, 'keep_freed_memory', lambda: calls.append(True))
    status = main.run(['--cfg', str(REPO / 'configs/demo/swin_micro_digits.yaml'), '--data-path',
                       str(tmp_path / 'missing'), '--output', str(tmp_path / 'out'), *opts])
    assert status == 2 and calls == expected  # stops at the missing data, after the setting
