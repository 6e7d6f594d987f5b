"""Export a trained model to ONNX, TorchScript, safetensors, or a timm / transformers folder, then check the export
against the eager model.

    python -m tools.export --weights CKPT --format onnx --output swin_t.onnx --dynamic-batch
    python -m tools.export --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --weights swin_tiny.pth \\
        --format torchscript --output swin_t.pt --dynamic-batch
    python -m tools.export --weights CKPT --format safetensors --output swin_t.safetensors
    python -m tools.export --weights CKPT --format hf --output swin_t_hf --data-path DATA   # class names of DATA

``--weights`` takes a file of any layout utils.weight_layouts reads, or a hub snapshot folder. The model comes
from ``--cfg`` (and ``--opts``), or from the config saved in our checkpoints, or from a snapshot's config.json,
and is the reference model in fp32 on the CPU: standard PyTorch ops only (none of the CPU kernels of
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
* ``timm``, ``hf``: a folder (``--output``) that ``timm.create_model(ARCH, pretrained=True,
  pretrained_cfg_overlay=dict(file=FOLDER/model.safetensors, num_classes=N))`` (and ``'local-dir:FOLDER'``) or
  ``transformers.AutoModelForImageClassification.from_pretrained(FOLDER)`` load as they are: the weights in
  their layout, config.json with the model's arguments, the class names and the evaluation preprocessing
  (DATA.INTERPOLATION; TEST.CROP as crop_pct 0.875). Class names: the sub-folders of ``--data-path`` (its
  ``train`` folder where it has one), else those of a snapshot read, else the data path saved in the
  checkpoint; none found, generic names and a warning. The check loads the folder back in timm or
  transformers. Swin V1 and V2 only (neither library has Swin-MLP or Swin-MoE).

After writing, the export runs (onnxruntime, ``torch.jit.load``, or the reloaded weights) on seeded
random images and the largest |logit difference| from the eager model is printed; above the
tolerance the command fails with one line and writes nothing. The image size is the config's DATA.IMG_SIZE, or
``--img-size`` (an int or H,W).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import warnings
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from config import img_size_hw
from data.build import input_spec
from data.label_file import run_classes
from data.transforms import cifar_sized
from engine import is_multilabel
from models import build_model, is_derived_buffer
from utils.checkpoint import load_converted
from utils.errors import UserError, exit_status
from utils.pretrained import read_for_use
from utils.weight_layouts import Snapshot, is_snapshot_folder, write_hf_folder, write_timm_folder

FORMATS = ('onnx', 'torchscript', 'safetensors', 'timm', 'hf')
FOLDER_FORMATS = ('timm', 'hf')  # written as a folder
CHECK_BATCHES = (1, 3)  # with --dynamic-batch: a batch other than the traced one shows the axis is free


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('Export a Swin model', add_help=True)
    parser.add_argument('--weights', '--resume', dest='weights', required=True, metavar='CKPT',
                        help='checkpoint: ours, a released {"model": ...} file, .safetensors, timm or transformers '
                             'weights, or a hub snapshot folder')
    parser.add_argument('--cfg', metavar='FILE', help='model config (default: the one saved in the checkpoint)')
    parser.add_argument('--opts', nargs='+', default=None, help='override config options: KEY VALUE pairs')
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--output', required=True, metavar='PATH', help='a file; a folder for timm and hf')
    parser.add_argument('--data-path', help='timm, hf: the training data whose sub-folders name the classes')
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


def read_model(args: argparse.Namespace) -> tuple[nn.Module, object, Snapshot]:
    """``(model, config, snapshot)``: the fp32 reference model in eval mode with the weights read (the snapshot:
    them in the official layout, with a config.json's class names and preprocessing where there was one)."""
    from utils.pretrained import build_config  # the same config rules as prediction: --cfg, else the saved one
    snapshot, saved = read_for_use(args.weights)
    opts = list(args.opts or [])
    if args.img_size:
        opts += ['DATA.IMG_SIZE', str(_parse_size(args.img_size))]
    opts += ['CPU_KERNELS', 'False']  # the reference modules: standard ops in the graph
    cfg = build_config(SimpleNamespace(cfg=args.cfg, opts=opts, weights=args.weights, native_size=False), saved,
                       snapshot)
    if cfg.MODEL.TYPE == 'swin_moe':
        raise UserError("MODEL.TYPE swin_moe: export covers swin, swinv2 and swin_mlp (the experts' routing is "
                        "data-dependent)")
    model = build_model(cfg, device='cpu')
    load_converted(model, snapshot.state, snapshot.layout, args.weights)
    return model.float().eval(), cfg, snapshot


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object, dict]:
    """``(model, config, state)``: the fp32 reference model in eval mode with the checkpoint's weights."""
    model, cfg, snapshot = read_model(args)
    return model, cfg, snapshot.state


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


_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}


def model_args_of(cfg) -> dict:
    """The model's constructor arguments (utils.weight_layouts' names) from its config."""
    section = cfg.MODEL[_SECTIONS[cfg.MODEL.TYPE]]
    args = {key.lower(): (list(value) if isinstance(value, (list, tuple)) else value)
            for key, value in section.items() if key in ('PATCH_SIZE', 'IN_CHANS', 'EMBED_DIM', 'DEPTHS',
                                                         'NUM_HEADS', 'WINDOW_SIZE', 'MLP_RATIO', 'QKV_BIAS',
                                                         'QK_SCALE', 'APE', 'PATCH_NORM')}
    if 'PRETRAINED_WINDOW_SIZES' in section:  # the config keeps 4 entries whatever the depth
        args['pretrained_window_sizes'] = list(section.PRETRAINED_WINDOW_SIZES)[:len(args['depths'])]
    size = cfg.DATA.IMG_SIZE
    args.update(img_size=list(size) if isinstance(size, (list, tuple)) else size, num_classes=cfg.MODEL.NUM_CLASSES)
    return args


def _folder_classes(root: Optional[str]) -> Optional[list[str]]:
    """The class folders of a data path (its ``train`` folder where it has one, as in training)."""
    if not root or not os.path.isdir(root):
        return None
    from data.datasets import find_classes
    train = os.path.join(root, 'train')
    return find_classes(train if os.path.isdir(train) else root)


def _multilabel_classes(args: argparse.Namespace, cfg) -> Optional[list[str]]:
    """A multi-label run's class names (data.label_file.run_classes), where its files can be read here."""
    if not cfg.DATA.LABEL_FILE:
        return None
    try:
        return run_classes(cfg.DATA.CLASSES_FILE, cfg.DATA.LABEL_FILE, args.data_path or cfg.DATA.DATA_PATH)
    except UserError as e:
        print(f"warning: {e}", file=sys.stderr)
        return None


def export_class_names(args: argparse.Namespace, cfg, snapshot: Snapshot) -> Optional[list[str]]:
    """The class names written into a timm / transformers config: a multi-label run's classes file (or label
    file), else --data-path's folders, else the snapshot's, else the folders of the data path saved in the
    checkpoint; None (and a warning) where none fit."""
    if args.data_path and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path not found: {args.data_path}")
    count = cfg.MODEL.NUM_CLASSES
    for where, names in (("the run's classes file (multi-label)", _multilabel_classes(args, cfg)),
                         ('--data-path', _folder_classes(args.data_path)),
                         ("the weights' config.json", snapshot.class_names),
                         ("the checkpoint's DATA.DATA_PATH", _folder_classes(cfg.DATA.DATA_PATH))):
        if names and len(names) == count:
            return list(names)
        if names:
            print(f"warning: {where} names {len(names)} classes, the model has {count}", file=sys.stderr)
    print(f"warning: no class names for the {count} classes (pass --data-path, the training data): the export "
          "names them generically", file=sys.stderr)
    return None


def export_preprocessing(cfg, snapshot: Snapshot) -> dict:
    """The evaluation preprocessing in timm's names: main.py's (DATA.INTERPOLATION; a centre crop of TEST.CROP_PCT
    with TEST.CROP, else a resize to the input size; DATA.MEAN / DATA.STD, one per input channel), or what a
    snapshot read says. Models of at most 32 px evaluate images as they are (the official rule for CIFAR-sized
    input): a resize to the input size, no crop, which leaves an image of that size as it is."""
    crop, spec = bool(cfg.TEST.CROP) and not cifar_sized(cfg.DATA.IMG_SIZE), input_spec(cfg)
    own = dict(interpolation=cfg.DATA.INTERPOLATION, crop_pct=float(cfg.TEST.CROP_PCT) if crop else 1.0,
               crop_mode='center' if crop else 'squash', mean=list(spec.mean), std=list(spec.std))
    return {**own, **{k: v for k, v in snapshot.preprocessing.items() if k != 'input_size'}}


def export_folder(args: argparse.Namespace, path: str, model: nn.Module, cfg, snapshot: Snapshot) -> None:
    """A timm or transformers folder at ``path`` from the model's weights (official layout)."""
    state = {k: v for k, v in model.state_dict().items() if not is_derived_buffer(k)}
    writer = write_timm_folder if args.format == 'timm' else write_hf_folder
    writer(path, state, cfg.MODEL.TYPE, model_args_of(cfg), export_class_names(args, cfg, snapshot),
           export_preprocessing(cfg, snapshot), multilabel=is_multilabel(cfg) or snapshot.multilabel)


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


def timm_runner(folder: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The folder loaded as a user would: timm's architecture by name, the weights file through the overlay (which
    must name a class count other than the architecture's 1000, or timm drops the classifier)."""
    import timm
    with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get('model_args', {}).items()}
    model = timm.create_model(config['architecture'], pretrained=True, num_classes=config['num_classes'],
                              pretrained_cfg_overlay=dict(file=os.path.join(folder, 'model.safetensors'),
                                                          num_classes=config['num_classes']), **kwargs).eval()
    return lambda x: model(x)


def hf_runner(folder: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    return lambda x: model(pixel_values=x).logits


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


def write_export(args: argparse.Namespace, path: str, model: nn.Module, cfg, snapshot: Snapshot) -> Callable:
    """Write ``args.format`` to ``path``; returns a function that runs the written export on a batch."""
    if args.format in FOLDER_FORMATS:
        export_folder(args, path, model, cfg, snapshot)
        return timm_runner(path) if args.format == 'timm' else hf_runner(path)
    x = example_input(model, cfg, args.batch_size)
    with _quiet_tracing():
        if args.format == 'onnx':
            export_onnx(model, x, path, args.dynamic_batch, args.opset)
            return onnx_runner(path)
        if args.format == 'torchscript':
            export_torchscript(model, x, path)
            return torchscript_runner(path)
        export_safetensors(snapshot.state, cfg, path)
        return safetensors_runner(path, args)


def _chmod_as_umask(path: str) -> None:
    """The mode a plain ``open()`` would give (some writers create their files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _check_output(path: str, as_folder: bool) -> None:
    """A folder export replaces only an earlier export (a snapshot folder) or an empty folder, never a file or
    a folder of other things; a file export never replaces a folder."""
    if as_folder and os.path.isfile(path):
        raise UserError(f"--output {path} is a file: timm and hf exports are folders")
    if as_folder and os.path.isdir(path) and os.listdir(path) and not is_snapshot_folder(path):
        raise UserError(f"--output {path}: a folder of other files (not an earlier export); name a new folder")
    if not as_folder and os.path.isdir(path):
        raise UserError(f"--output {path} is a folder: name the file to write")


def _replace_folder(tmp: str, path: str) -> None:
    """The checked folder in place of ``path`` (an earlier export there is moved aside, then removed)."""
    old = f'{tmp}.old'
    if os.path.isdir(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
    as_folder = args.format in FOLDER_FORMATS
    _check_output(args.output, as_folder)
    model, cfg, snapshot = read_model(args)
    base, ext = os.path.splitext(os.path.basename(args.output.rstrip('/\\')))
    tmp = os.path.join(folder, f'.{base}.{os.getpid()}.tmp{"" if as_folder else ext}')
    try:
        run = write_export(args, tmp, model, cfg, snapshot)
        batches = CHECK_BATCHES if args.dynamic_batch else (args.batch_size,)
        worst, scale = max_logit_difference(model, run, cfg, batches)
        if worst > args.tolerance * max(1.0, scale):
            raise UserError(f"{args.output}: the export differs from the eager model by {worst:.3g} in a logit, "
                            f"more than the tolerance {args.tolerance:g} x {max(1.0, scale):.3g}; not written")
        if as_folder:
            _replace_folder(tmp, args.output)
        else:
            _chmod_as_umask(tmp)
            os.replace(tmp, args.output)
    except OSError as e:
        raise UserError(f"--output {args.output}: could not write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            else:
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
