"""Mixed precision: which autocast type to use, and the backward/clip/step helper of the official loop.

``resolve_amp`` turns AMP_ENABLE / AMP_DTYPE into (enabled, dtype); 'auto' takes bfloat16 only where the
hardware computes it. Only float16 needs loss scaling;
bfloat16 and full precision run the same helper with scaling switched off, so the engine has one path.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Iterable, Optional

import torch

from utils.errors import UserError
from utils.sharding import plain_tensor

_logger = logging.getLogger(__name__)
_DTYPES = {'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
           'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16}


def resolve_amp(config, device: torch.device | str) -> tuple[bool, Optional[torch.dtype]]:
    """(enabled, dtype) from AMP_ENABLE and AMP_DTYPE. 'auto' is bfloat16 where the device computes it natively
    (a GPU of compute capability 8.0 or newer; a CPU with AVX512-BF16, AMX or Arm's BF16), float16 with loss
    scaling on older GPUs, and full precision on other CPUs, where bfloat16 is emulated and several times
    slower than float32; it logs which and why."""
    if not config.AMP_ENABLE:
        return False, None
    device_type = torch.device(device).type
    name = str(config.get('AMP_DTYPE', 'auto')).lower()
    if name == 'auto':
        return _auto_amp(device_type)
    if name not in _DTYPES:
        raise UserError(f"AMP_DTYPE {name!r} is not supported; choose auto, float16 or bfloat16")
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device_type != 'cuda':
        raise UserError(f"AMP_DTYPE float16 needs a CUDA device (this run is on {device_type}); "
                        "use bfloat16 or --disable_amp")
    if dtype == torch.bfloat16 and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError("AMP_DTYPE bfloat16 is not supported by this GPU; use float16")
    return True, dtype


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    """The choice is made again wherever a run needs the dtype; it is logged once per process."""
    _logger.info(message)


def _auto_amp(device_type: str) -> tuple[bool, Optional[torch.dtype]]:
    if device_type == 'cuda':
        if cuda_bf16_native():
            _say_once("AMP_DTYPE auto: bfloat16 (the GPU computes it natively; AMP_DTYPE float16 for the "
                      "official fp16 recipe)")
            return True, torch.bfloat16
        _say_once("AMP_DTYPE auto: float16 with loss scaling (this GPU has no native bfloat16)")
        return True, torch.float16
    native, why = cpu_bf16_support()
    if native:
        _say_once(f"AMP_DTYPE auto: bfloat16 (this CPU computes it natively: {why})")
        return True, torch.bfloat16
    _say_once(f"AMP_DTYPE auto: float32 (this CPU emulates bfloat16: {why}; AMP_DTYPE bfloat16 forces it)")
    return False, None


def cuda_bf16_native() -> bool:
    """Whether the current GPU computes bfloat16 in hardware (compute capability 8.0+), not by emulation."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument answers for hardware support
        return torch.cuda.is_bf16_supported()


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): whether this CPU has bfloat16 arithmetic (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
    the flags the kernel reports; where none are readable, a small matrix product timed once in both types."""
    flags = _cpu_flags()
    if flags is not None:
        found = sorted(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})
        if found:
            return True, ', '.join(found)
        return False, 'no avx512_bf16, amx_bf16 or bf16 in the CPU flags'
    bf16, fp32 = _matmul_seconds(torch.bfloat16), _matmul_seconds(torch.float32)
    return bf16 <= fp32, f'a 256 x 256 product takes {bf16 * 1e3:.2f} ms in bfloat16, {fp32 * 1e3:.2f} ms in float32'


def _cpu_flags() -> Optional[set]:
    """The CPU's feature flags (x86 'flags', Arm 'Features') from /proc/cpuinfo; None where it cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        pass
    return None


def _matmul_seconds(dtype: torch.dtype, size: int = 256, repeats: int = 5) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: the kernel choice and its buffers
    best = float('inf')
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Global norm of the gradients (0 when there are none), as one tensor, without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)


def job_grad_norm(parameters: list[torch.Tensor], norm_type: float = 2.0) -> Optional[torch.Tensor]:
    """The norm of the whole job's gradient where some parameters live on one rank only (Swin-MoE's experts,
    ``skip_allreduce``): the shared parameters' part (the same on every rank after DDP) plus every rank's own
    part, summed over the ranks, so that every rank clips by the same factor and skips the same steps, and the
    shared weights stay equal. None without rank-local parameters or a process group (use :func:`grad_norm`)."""
    own = [p.grad for p in parameters if p.grad is not None and getattr(p, 'skip_allreduce', False)]
    if not own or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if norm_type != 2.0:
        raise ValueError("job_grad_norm sums squares over the ranks: the 2-norm only")
    shared = [p.grad for p in parameters if p.grad is not None and not getattr(p, 'skip_allreduce', False)]
    own_sq = torch.nn.utils.get_total_norm(own).float() ** 2
    torch.distributed.all_reduce(own_sq)
    shared_sq = torch.nn.utils.get_total_norm(shared).float() ** 2 if shared else torch.zeros_like(own_sq)
    return (own_sq + shared_sq.to(own_sq.device)).sqrt()


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-d tensor ``skip`` is true.

    Optimizers that support GradScaler's protocol (torch's fused AdamW, Adam, SGD) get ``skip`` as their
    ``found_inf`` and leave every state untouched on the device where it is true: no host synchronisation.
    Others are stepped after reading ``skip`` on the host.
    """
    if getattr(optimizer, '_step_supports_amp_scaling', False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


class GradScalerWithNorm:
    """Backward, unscale, clip (or measure) the global grad norm, step, update: one call per micro-batch.

    ``enabled`` turns on float16 loss scaling (torch.amp.GradScaler); without it backward is plain and a step
    whose gradients are not finite is not applied either. After an update, ``last_skipped`` is a 0-d bool
    tensor on the gradients' device saying whether the step was skipped; it is not read here, so a step needs
    no host synchronisation where the optimizer takes the skip decision on the device (torch's fused
    optimizers, through the same ``found_inf`` protocol as GradScaler). Other optimizers wait for it.
    """
    state_dict_key = 'amp_scaler'

    def __init__(self, enabled: bool = True, device_type: str = 'cuda') -> None:
        self._scaler = torch.amp.GradScaler(device_type, enabled=bool(enabled))
        self.enabled = self._scaler.is_enabled()  # torch turns it off (with a warning) without CUDA
        self.last_skipped: Optional[torch.Tensor] = None

    @property
    def last_step_skipped(self) -> bool:
        """``last_skipped`` read on the host (a synchronisation)."""
        return self.last_skipped is not None and bool(self.last_skipped)

    @property
    def last_grad_finite(self) -> bool:
        return not self.last_step_skipped

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: Optional[float] = None,
                 parameters: Optional[Iterable[torch.Tensor]] = None, create_graph: bool = False,
                 update_grad: bool = True) -> Optional[torch.Tensor]:
        """Returns the total grad norm (before clipping) when the optimizer was stepped, else None."""
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        if parameters is None:
            parameters = [p for group in optimizer.param_groups for p in group['params']]
        parameters = list(parameters)  # may be a generator, and is used twice
        self._scaler.unscale_(optimizer)
        norm = job_grad_norm(parameters)
        if norm is not None:  # experts on every rank of their own (Swin-MoE): one norm for the whole job
            if clip_grad:
                torch.nn.utils.clip_grads_with_norm_(parameters, clip_grad, norm)
        elif clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = grad_norm(parameters)
        norm = plain_tensor(norm)  # over FSDP's sharded gradients the norm is a (replicated) DTensor
        # the norm of the unscaled gradients is finite exactly when GradScaler finds no inf/NaN in them
        self.last_skipped = torch.logical_not(torch.isfinite(norm.detach()))
        if self.enabled:
            self._scaler.step(optimizer)  # skipped by the scaler when it found inf/NaN (on the device if fused)
            self._scaler.update()
        else:
            # without loss scaling nobody else guards the weights: an inf/NaN step is not applied
            step_unless(optimizer, self.last_skipped)
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()  # {} when scaling is off, as torch's GradScaler

    def load_state_dict(self, state_dict: dict) -> bool:
        """Load a saved scaler; returns False (and keeps the current state) when there is nothing to load.

        A float16 run resumed from a bfloat16/fp32 checkpoint (empty state) keeps its fresh scale,
        and a bfloat16 run ignores a float16 checkpoint's scale.
        """
        if not self.enabled or not state_dict:
            return False
        self._scaler.load_state_dict(state_dict)
        return True

    def get_scale(self) -> float:
        """The current loss scale (1.0 when scaling is off)."""
        return self._scaler.get_scale() if self.enabled else 1.0

