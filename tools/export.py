"""Export a trained model to ONNX, TorchScript or safetensors, then check the export against the eager model.

    python -m tools.export --weights CKPT --format onnx --output swin_t.onnx --dynamic-batch
    python -m tools.export --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --weights swin_tiny.pth \\
        --format torchscript --output swin_t.pt --dynamic-batch
    python -m tools.export --weights CKPT --format safetensors --output swin_t.safetensors

The model comes from ``--cfg`` (and ``--opts``), or from the config saved in our checkpoints, and is
the reference model in fp32 on the CPU: standard PyTorch ops only (none of the CPU kernels of
``models/cpu``), so the exported graph is made of standard ONNX or TorchScript operators.

* ``onnx``: torch's TorchScript-based ONNX exporter (``dynamo=False``): on torch 2.14 the
  ``torch.export``-based one fails while decomposing the window attention under a dynamic batch.
  ``--dynamic-batch`` names the batch axis of ``input`` and ``logits``.
* ``torchscript``: ``torch.jit.trace``; the trace reads the batch size from the input, so the saved
  module takes any batch (checked at batch 1 and 3 with ``--dynamic-batch``). torch 2.14 marks
  ``torch.jit`` deprecated; it is kept for deployments that load TorchScript (libtorch, Triton).
* ``safetensors``: the state dict under the official key names, the config as YAML text in the
  metadata (key ``config``); ``--pretrained``, ``--resume``, ``--eval``, ``predict.py`` and
  ``validate.py`` read such files.

After writing, the export runs (onnxruntime, ``torch.jit.load``, or the reloaded weights) on seeded
random images and the largest |logit difference| from the eager model is printed; above the
tolerance the command fails with one line and writes nothing. The image size is the config's DATA.IMG_SIZE, or
``--img-size`` (an int or H,W).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from config import img_size_hw
from models import build_model, is_derived_buffer
from utils.checkpoint import load_model_state
from utils.fileio import load_file_safe, local_path
from utils.errors import UserError, exit_status

FORMATS = ('onnx', 'torchscript', 'safetensors')
CHECK_BATCHES = (1, 3)  # with --dynamic-batch: a batch other than the traced one shows the axis is free


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('Export a Swin model', add_help=True)
    parser.add_argument('--weights', '--resume', dest='weights', required=True, metavar='CKPT',
                        help='checkpoint: ours, a released {"model": ...} file, or .safetensors')
    parser.add_argument('--cfg', metavar='FILE', help='model config (default: the one saved in the checkpoint)')
    parser.add_argument('--opts', nargs='+', default=None, help='override config options: KEY VALUE pairs')
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--output', required=True, metavar='PATH')
    parser.add_argument('--img-size', metavar='S|H,W', help='input size (default: DATA.IMG_SIZE)')
    parser.add_argument('--batch-size', type=int, default=1, help='batch of the traced example input')
    parser.add_argument('--dynamic-batch', action='store_true', help='leave the batch axis free')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset version')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest |logit difference| allowed, relative to max(1, largest |logit|)')
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ model

def _parse_size(text: str) -> list[int]:
    try:
        sides = [int(v) for v in text.replace('x', ',').split(',')]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise UserError(f"--img-size {text!r}: expected a side or H,W (positive integers)")
    return sides


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object, dict]:
    """``(model, config, state)``: the fp32 reference model in eval mode with the checkpoint's weights."""
    from predict import build_config  # the same config rules as prediction: --cfg, else the saved one
    ckpt = load_file_safe(local_path(args.weights))
    opts = list(args.opts or [])
    if args.img_size:
        opts += ['DATA.IMG_SIZE', str(_parse_size(args.img_size))]
    opts += ['CPU_KERNELS', 'False']  # the reference modules: standard ops in the graph
    cfg = build_config(SimpleNamespace(cfg=args.cfg, opts=opts, weights=args.weights, native_size=False), ckpt)
    if cfg.MODEL.TYPE == 'swin_moe':
        raise UserError("MODEL.TYPE swin_moe: export covers swin, swinv2 and swin_mlp (the experts' routing is "
                        "data-dependent)")
    model = build_model(cfg, device='cpu')
    state = ckpt.get('model', ckpt.get('state_dict', ckpt))
    load_model_state(model, state, args.weights)
    return model.float().eval(), cfg, state


def example_input(model: nn.Module, cfg, batch: int, seed: int = 0) -> torch.Tensor:
    """Seeded normalised-image-like inputs of the config's size and the model's channels."""
    height, width = img_size_hw(cfg.DATA.IMG_SIZE)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.patch_embed.proj.in_channels, height, width, generator=gen)


# ------------------------------------------------------------------------------------------ writers

@contextlib.contextmanager
def _quiet_tracing():
    """The tracer warns about every Python-level shape check it freezes; the export is checked numerically
    instead, at more than one batch size. The deprecation notices of the legacy ONNX exporter and of
    ``torch.jit`` are known (see the module docstring and the README)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
        warnings.filterwarnings('ignore', message='The feature will be removed', category=DeprecationWarning)
        warnings.filterwarnings('ignore', message=r'`torch\.jit\.\w+` is deprecated', category=FutureWarning)
        yield


def export_onnx(model: nn.Module, x: torch.Tensor, path: str, dynamic_batch: bool, opset: int) -> None:
    axes = {'input': {0: 'batch'}, 'logits': {0: 'batch'}} if dynamic_batch else None
    torch.onnx.export(model, (x,), path, input_names=['input'], output_names=['logits'], dynamic_axes=axes,
                      opset_version=opset, dynamo=False, do_constant_folding=True)


def export_torchscript(model: nn.Module, x: torch.Tensor, path: str) -> None:
    traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(path)


def export_safetensors(state: dict, cfg, path: str) -> None:
    from safetensors.torch import save_file
    # The learned tensors under their official names; buffers the model recomputes are left out.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()
               if isinstance(v, torch.Tensor) and not is_derived_buffer(k)}
    save_file(tensors, path, metadata={'format': 'pt', 'config': cfg.dump()})


# ------------------------------------------------------------------------------------------ checks

def onnx_runner(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return lambda x: torch.from_numpy(session.run(None, {'input': x.numpy()})[0])


def torchscript_runner(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.jit.load(path, map_location='cpu').eval()
    return lambda x: module(x)


def safetensors_runner(path: str, args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    reloaded, _, _ = load_model(argparse.Namespace(**{**vars(args), 'weights': path}))
    return lambda x: reloaded(x)


@torch.no_grad()
def max_logit_difference(model: nn.Module, run: Callable, cfg, batches: Sequence[int]) -> tuple[float, float]:
    """``(largest |export - eager|, largest |eager logit|)`` over seeded inputs of each batch size."""
    worst, scale = 0.0, 0.0
    for i, batch in enumerate(batches):
        x = example_input(model, cfg, batch, seed=1 + i)
        expected = model(x)
        got = run(x)
        if tuple(got.shape) != tuple(expected.shape):
            raise UserError(f"the export gives logits of shape {tuple(got.shape)} for a batch of {batch}, "
                            f"the model {tuple(expected.shape)}")
        worst = max(worst, float((got.float() - expected).abs().max()))
        scale = max(scale, float(expected.abs().max()))
    return worst, scale


def write_export(args: argparse.Namespace, path: str, model: nn.Module, cfg, state: dict) -> Callable:
    """Write ``args.format`` to ``path``; returns a function that runs the written export on a batch."""
    x = example_input(model, cfg, args.batch_size)
    with _quiet_tracing():
        if args.format == 'onnx':
            export_onnx(model, x, path, args.dynamic_batch, args.opset)
            return onnx_runner(path)
        if args.format == 'torchscript':
            export_torchscript(model, x, path)
            return torchscript_runner(path)
        export_safetensors(state, cfg, path)
        return safetensors_runner(path, args)


def _chmod_as_umask(path: str) -> None:
    """The mode a plain ``open()`` would give (some writers create their files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export(args: argparse.Namespace) -> float:
    """Write the export and check it; returns the largest |logit difference|.

    The export goes to a temporary file beside ``--output`` that replaces it only once the check passes:
    a failed export or check leaves an earlier file at ``--output`` as it was.
    """
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UserError(f"--output {args.output}: folder {folder} does not exist")
    model, cfg, state = load_model(args)
    base, ext = os.path.splitext(os.path.basename(args.output))
    tmp = os.path.join(folder, f'.{base}.{os.getpid()}.tmp{ext}')
    try:
        run = write_export(args, tmp, model, cfg, state)
        batches = CHECK_BATCHES if args.dynamic_batch else (args.batch_size,)
        worst, scale = max_logit_difference(model, run, cfg, batches)
        if worst > args.tolerance * max(1.0, scale):
            raise UserError(f"{args.output}: the export differs from the eager model by {worst:.3g} in a logit, "
                            f"more than the tolerance {args.tolerance:g} x {max(1.0, scale):.3g}; not written")
        _chmod_as_umask(tmp)
        os.replace(tmp, args.output)
    except OSError as e:
        raise UserError(f"--output {args.output}: could not write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    print(f"{args.format} export written to {args.output}")
    print(f"max |logit difference| against the eager model: {worst:.3g} (batches {', '.join(map(str, batches))}; "
          f"largest |logit| {scale:.3g})")
    return worst


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: user mistakes and failed checks are one line on stderr and exit status 2."""
    return exit_status(lambda: export(parse_args(argv)))


if __name__ == '__main__':
    sys.exit(run())
