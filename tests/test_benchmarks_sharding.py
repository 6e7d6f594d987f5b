"""benchmarks.sharding_memory counts what each rank holds: under fsdp about 1/N of ddp's."""
from __future__ import annotations

from benchmarks.sharding_memory import report
from cli import write_tiny_config
from conftest import needs_cpu_fsdp

pytestmark = needs_cpu_fsdp


def test_fsdp_ranks_hold_about_half_of_ddps_bytes_at_two_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr('benchmarks.sharding_memory.START_METHOD', 'forkserver')
    rows = report(str(write_tiny_config(tmp_path)), worlds=[2])
    ddp, fsdp = rows
    assert ddp['sharding'] == 'ddp' and ddp['optimizer'] >= 2 * ddp['parameters'] > 0  # both AdamW moments
    assert abs(fsdp['ratio'] - 0.5) < 0.05
    assert 'fsdp/ddp 0.5' in capsys.readouterr().out
