"""configure_cuda: TF32 on or off for fp32 products, with every precision getter of torch still answering
(the flags are process settings: they can be set and read without a GPU)."""
from __future__ import annotations

import subprocess
import sys

from cli import REPO

_READ_EVERY_GETTER = """
import torch
from utils.cuda import configure_cuda
for allow in (True, False):
    configure_cuda(allow_tf32=allow)
    matmul = torch.backends.cuda.matmul
    print(torch.get_float32_matmul_precision(), matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
          getattr(matmul, 'fp32_precision', None), torch.backends.cudnn.benchmark)
"""


def test_every_precision_getter_answers_after_configure_cuda():
    """inductor's max-autotune reads get_float32_matmul_precision(); it raised after the newer fp32_precision
    flags were set. In a fresh process: the settings are global."""
    done = subprocess.run([sys.executable, '-c', _READ_EVERY_GETTER], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    on, off = (line.split() for line in done.stdout.splitlines())
    assert on[:3] + on[4:] == ['high', 'True', 'True', 'True'] and on[3] in ('tf32', 'None')
    assert off[:3] + off[4:] == ['highest', 'False', 'False', 'True'] and off[3] in ('ieee', 'None')
