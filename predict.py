"""Classify image files with a trained or released model: the top-5 classes and their probabilities.

    python predict.py --weights output/swin_tiny_patch4_window7_224/default/ckpt_epoch_299.pth photo.jpg
    python predict.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml \\
        --weights swin_tiny_patch4_window7_224.pth --device cpu photos/
    python predict.py --weights CKPT --native-size photo.jpg   # at the photo's own resolution, no crop
    python predict.py --weights hub/swin_tiny_patch4_window7_224 photo.jpg   # a timm or transformers folder

``--weights`` takes a ``.pth``/``.bin``/``.safetensors`` file of any layout utils.weight_layouts reads
(official, timm, transformers, mmdet, detection) or a hub snapshot folder (``config.json`` + weights, read
offline); one line on stderr names the layout. The model comes from ``--cfg`` (and ``--opts``), else from the
config saved in checkpoints written by main.py, else from a timm / transformers config.json (the folder's, or
one beside the file). Class names: the sub-folders of ``--data-path`` (its ``train`` folder when it has one, as
in training), else the config.json's (transformers' ``id2label``, timm's ``label_names``), else the data path
saved in our checkpoint, else the ImageNet-1K names for a 1000-class model, else ``class <i>``. Images are
prepared as the config.json says where it does (timm's ``crop_pct``/``crop_mode``, ``mean``/``std``,
``interpolation``; transformers' image processor), else as evaluation in main.py does (the config's IN_CHANS,
DATA.MEAN / DATA.STD, TEST.CROP_PCT, DATA.INTERPOLATION): a 1-channel model reads images as grayscale (16-bit kept),
an N-channel one multi-page TIFF, N-band images or ``.npy`` arrays. Folders are searched recursively for images.

A multi-label model (trained with DATA.LABEL_FILE, or a folder whose config.json says multi_label_classification)
prints, per image, every class whose sigmoid probability is at least ``--threshold`` (default: the config's
TEST.THRESHOLD), best first; its class names come from DATA.CLASSES_FILE or the label file when they can be read,
else ``class <i>``. A single-label model prints its top ``--topk`` classes by softmax probability.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torchvision import transforms as T

from config import img_size_hw
from data.build import build_transform, input_spec
from data.datasets import ARRAY_EXTENSIONS, IMG_EXTENSIONS, find_classes
from data.decode import ChannelDecoder, decode_pil
from data.label_file import run_classes
from data.transforms import InputSpec, build_eval_transform
from engine import is_multilabel
from models import build_model
from utils.checkpoint import load_converted
from utils.errors import UserError, exit_status
from utils.host_memory import keep_freed_memory
from utils.pretrained import build_config, read_for_use


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('Swin Transformer prediction', add_help=True)
    parser.add_argument('images', nargs='+', help='image files or folders of images')
    parser.add_argument('--weights', '--resume', '--pretrained', dest='weights', required=True, metavar='CKPT',
                        help="checkpoint: ours (ckpt_epoch_N.pth), a released {'model': ...} file, timm or "
                             "transformers weights, or a hub snapshot folder (config.json + weights)")
    parser.add_argument('--cfg', metavar='FILE', help="model config (default: the one saved in the checkpoint)")
    parser.add_argument('--opts', nargs='+', default=None, help="override config options: KEY VALUE pairs")
    parser.add_argument('--data-path', help='training data folder whose sub-folders name the classes')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--topk', type=int, default=5, help='single-label models: how many classes to print')
    parser.add_argument('--threshold', type=float, default=None,
                        help='multi-label models: print every class with at least this probability, in (0, 1) '
                             '(default: TEST.THRESHOLD of the config)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--native-size', action='store_true',
                        help='classify each image at its own resolution (no resize or crop): the model is built '
                             'with MODEL.DYNAMIC_IMG_SIZE, which pads to patch and window multiples')
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ config

# ------------------------------------------------------------------------------------------ classes

def class_names(cfg, data_path: Optional[str], known: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the model's classes (see the module docstring for where they come from); ``known``: the
    names a snapshot's config.json gives."""
    if data_path and not os.path.isdir(data_path):
        raise UserError(f"--data-path not found: {data_path}")
    if known and len(known) == cfg.MODEL.NUM_CLASSES and not data_path:
        return list(known)
    if cfg.DATA.LABEL_FILE:  # a multi-label run of ours
        return _counted(_label_file_classes(cfg, data_path), cfg.MODEL.NUM_CLASSES)
    for root in (data_path, cfg.DATA.DATA_PATH):
        if root and os.path.isdir(root):
            train = os.path.join(root, 'train')
            names = find_classes(train if os.path.isdir(train) else root)
            if names:
                return _counted(names, cfg.MODEL.NUM_CLASSES)
    if cfg.MODEL.NUM_CLASSES == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo('imagenet-1k')
        return [info.index_to_description(i) for i in range(1000)]
    return _counted([], cfg.MODEL.NUM_CLASSES)


def _counted(names: Sequence[str], count: int) -> list[str]:
    """``count`` names: ``names``, then ``class <i>`` for the classes they do not name (a warning when they are
    not as many as the model's outputs)."""
    if names and len(names) != count:
        print(f"warning: {len(names)} class names for a model of {count} classes: the names are taken in order",
              file=sys.stderr)
    return list(names[:count]) + [f'class {i}' for i in range(len(names), count)]


def _label_file_classes(cfg, data_path: Optional[str]) -> list[str]:
    """A multi-label run's class names (data.label_file.run_classes; relative files resolved against --data-path,
    else the run's DATA_PATH); none, and a warning, where the file is not on this machine or does not read."""
    try:
        return run_classes(cfg.DATA.CLASSES_FILE, cfg.DATA.LABEL_FILE, data_path or cfg.DATA.DATA_PATH)
    except UserError as e:
        print(f"warning: no class names ({e}): classes are named class <i>", file=sys.stderr)
        return []


# ------------------------------------------------------------------------------------------ images

def image_files(paths: Iterable[str], extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """The files given, plus every file with one of ``extensions`` under the folders given (sorted); UserError
    for a missing path."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, _, files in sorted(os.walk(path)):
                found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(extensions)]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"no such image or folder: {path}")
    if not found:
        raise UserError(f"no images ({', '.join(extensions)}) found in {', '.join(paths)}")
    return found


@dataclass
class Preprocess:
    """How a file becomes the model's input: its bytes decoded (a PIL image, or a float tensor of the model's
    channels), then transformed."""
    decoder: Callable[[bytes], Any]
    transform: Callable[[Any], torch.Tensor]

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(self.decoder(data))


def _load_images(files: Sequence[str], preprocess: Preprocess) -> tuple[list[str], list[torch.Tensor]]:
    kept, tensors = [], []
    for path in files:
        try:
            with open(path, 'rb') as f:
                tensor = preprocess(f.read())
        except Exception as e:  # any unreadable file is reported and skipped
            print(f"{path}: unreadable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        kept.append(path)
        tensors.append(tensor)
    return kept, tensors


@torch.no_grad()
def predict(model: torch.nn.Module, files: Sequence[str], preprocess: Preprocess, device: torch.device,
            batch_size: int = 32, multilabel: bool = False) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(path, probabilities)`` for each readable image: the softmax over the classes, or for a
    ``multilabel`` model each class's own sigmoid."""
    model.eval()
    for start in range(0, len(files), batch_size):
        kept, tensors = _load_images(files[start:start + batch_size], preprocess)
        if not tensors:
            continue
        if len({t.shape for t in tensors}) == 1:
            logits = model(torch.stack(tensors).to(device))
        else:  # images at their own sizes (--native-size): one at a time
            logits = torch.cat([model(t[None].to(device)) for t in tensors])
        probs = logits.float().sigmoid() if multilabel else logits.float().softmax(dim=-1)
        yield from zip(kept, probs.cpu())


def top_classes(probs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable classes, best first: ``[(class index, probability), ...]``."""
    values, indices = probs.topk(min(k, probs.numel()))
    return list(zip(indices.tolist(), values.tolist()))


def classes_at_least(probs: torch.Tensor, threshold: float) -> list[tuple[int, float]]:
    """Every class whose probability is at least ``threshold``, best first (a multi-label model's answer)."""
    return [(i, p) for i, p in top_classes(probs, probs.numel()) if p >= threshold]


def _device(name: str) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def build_preprocess(cfg, preprocessing: dict, native_size: bool = False) -> Preprocess:
    """How images are prepared: main.py's evaluation (the plain path of data.build.build_transform: IN_CHANS,
    DATA.MEAN / DATA.STD, TEST.CROP / TEST.CROP_PCT, DATA.INTERPOLATION), or as a snapshot's ``preprocessing``
    (timm's names) says where it says anything. ``native_size``: normalisation alone."""
    spec = input_spec(cfg)
    mean, std = tuple(preprocessing.get('mean', spec.mean)), tuple(preprocessing.get('std', spec.std))
    if len(mean) == spec.channels and len(std) == spec.channels:
        spec = InputSpec(spec.channels, mean, std)
    else:  # e.g. a grayscale model exported with ImageNet's statistics
        print(f"warning: the weights' preprocessing has mean {list(mean)} and std {list(std)} for a model of "
              f"{spec.channels} channels: DATA.MEAN {list(spec.mean)} and DATA.STD {list(spec.std)} are used",
              file=sys.stderr)
    if native_size:
        if spec.rgb:
            return Preprocess(decode_pil, T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)]))
        return Preprocess(ChannelDecoder(spec.channels), T.Normalize(spec.mean, spec.std))
    if preprocessing:
        return _snapshot_preprocess(cfg, spec, preprocessing)
    transform, decoder, _ = build_transform(False, _without_fast_loader(cfg))
    return Preprocess(decoder, transform)


def _snapshot_preprocess(cfg, spec: InputSpec, preprocessing: dict) -> Preprocess:
    """A snapshot's evaluation transform at the model's input size: RGB through timm's own, other channel counts
    through ours on the decoded channels (timm's reads PIL images) with its crop and interpolation."""
    interpolation = preprocessing.get('interpolation', cfg.DATA.INTERPOLATION)
    crop_mode = preprocessing.get('crop_mode', 'center')
    crop_pct = preprocessing.get('crop_pct', cfg.TEST.CROP_PCT if cfg.TEST.CROP else 1.0)
    if not spec.rgb:
        transform, decoder, _ = build_eval_transform(cfg.DATA.IMG_SIZE, interpolation, crop=crop_mode != 'squash',
                                                     fast=False, crop_pct=crop_pct, spec=spec)
        return Preprocess(decoder, transform)
    from timm.data import create_transform
    height, width = img_size_hw(cfg.DATA.IMG_SIZE)
    return Preprocess(decode_pil, create_transform((3, height, width), is_training=False, mean=spec.mean,
                                                   std=spec.std, interpolation=interpolation, crop_pct=crop_pct,
                                                   crop_mode=crop_mode))


def _without_fast_loader(cfg):
    """``cfg`` with DATA.FAST_LOADER off: one image at a time, normalised in its transform (no batch step)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATA.FAST_LOADER = False
    return cfg


def main(args: argparse.Namespace) -> None:
    missing = [path for path in args.images if not os.path.exists(path)]
    if missing:  # the one line, before any weights are read
        raise UserError(f"no such image or folder: {missing[0]}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold:g}")
    snapshot, saved = read_for_use(args.weights)
    print(f"weights: {snapshot.describe()}", file=sys.stderr)
    if snapshot.layout.name == 'simmim':
        raise UserError(f"{args.weights} is a SimMIM pre-training checkpoint (no classifier): fine-tune it "
                        "first with main_simmim_ft.py --pretrained")
    cfg = build_config(args, saved, snapshot)
    preprocess = build_preprocess(cfg, snapshot.preprocessing, args.native_size)
    files = image_files(args.images, IMG_EXTENSIONS if input_spec(cfg).rgb else IMG_EXTENSIONS + ARRAY_EXTENSIONS)
    device = _device(args.device)
    if cfg.HOST_MEMORY_CACHE and device.type == 'cpu':
        keep_freed_memory()
    model = build_model(cfg, device=device)
    load_converted(model, snapshot.state, snapshot.layout, args.weights)
    model.to(device)
    names = class_names(cfg, args.data_path, snapshot.class_names)
    multilabel = is_multilabel(cfg) or snapshot.multilabel
    threshold = cfg.TEST.THRESHOLD if args.threshold is None else args.threshold
    for path, probs in predict(model, files, preprocess, device, args.batch_size, multilabel):
        print(path)
        found = classes_at_least(probs, threshold) if multilabel else top_classes(probs, args.topk)
        for index, prob in found:
            print(f"  {100 * prob:6.2f}%  {names[index]}")
        if multilabel and not found:
            print(f"  no class at or above {100 * threshold:g}%")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: user mistakes are one line on stderr and exit status 2."""
    return exit_status(lambda: main(parse_args(argv)))


if __name__ == '__main__':
    sys.exit(run())
