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
``interpolation``; transformers' image processor), else as the official evaluation does. Folders are searched
recursively for images.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Optional, Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from config import img_size_hw
from data.datasets import IMG_EXTENSIONS, find_classes
from data.decode import decode_pil
from data.transforms import build_eval_transform
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
    parser.add_argument('--topk', type=int, default=5)
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
    if known and len(known) == cfg.MODEL.NUM_CLASSES and not data_path:
        return list(known)
    for root in (data_path, cfg.DATA.DATA_PATH):
        if root and os.path.isdir(root):
            train = os.path.join(root, 'train')
            names = find_classes(train if os.path.isdir(train) else root)
            if names:
                return names + [f'class {i}' for i in range(len(names), cfg.MODEL.NUM_CLASSES)]
        elif root == data_path and root:
            raise UserError(f"--data-path not found: {root}")
    if cfg.MODEL.NUM_CLASSES == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo('imagenet-1k')
        return [info.index_to_description(i) for i in range(1000)]
    return [f'class {i}' for i in range(cfg.MODEL.NUM_CLASSES)]


# ------------------------------------------------------------------------------------------ images

def image_files(paths: Iterable[str]) -> list[str]:
    """The files given, plus every image under the folders given (sorted); UserError for a missing path."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, _, files in sorted(os.walk(path)):
                found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"no such image or folder: {path}")
    if not found:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {', '.join(paths)}")
    return found


def _load_images(files: Sequence[str], transform) -> tuple[list[str], list[torch.Tensor]]:
    kept, tensors = [], []
    for path in files:
        try:
            with open(path, 'rb') as f:
                image = decode_pil(f.read())
        except Exception as e:  # any unreadable file is reported and skipped
            print(f"{path}: unreadable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        kept.append(path)
        tensors.append(transform(image))
    return kept, tensors


@torch.no_grad()
def predict(model: torch.nn.Module, files: Sequence[str], transform, device: torch.device, topk: int = 5,
            batch_size: int = 32) -> Iterable[tuple[str, list[tuple[int, float]]]]:
    """Yield ``(path, [(class index, probability), ...])`` for each readable image, best class first."""
    model.eval()
    for start in range(0, len(files), batch_size):
        kept, tensors = _load_images(files[start:start + batch_size], transform)
        if not tensors:
            continue
        if len({t.shape for t in tensors}) == 1:
            logits = model(torch.stack(tensors).to(device))
        else:  # images at their own sizes (--native-size): one at a time
            logits = torch.cat([model(t[None].to(device)) for t in tensors])
        probs = logits.float().softmax(dim=-1)
        values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        for path, v, i in zip(kept, values.tolist(), indices.tolist()):
            yield path, list(zip(i, v))


def _device(name: str) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def eval_transform(cfg, preprocessing: dict, native_size: bool = False):
    """How images are prepared: a snapshot's ``preprocessing`` (timm's names) where it gives any, through timm's
    own evaluation transform at the model's input size; else the official evaluation (DATA.INTERPOLATION,
    TEST.CROP). ``native_size``: normalisation alone."""
    mean = tuple(preprocessing.get('mean', IMAGENET_DEFAULT_MEAN))
    std = tuple(preprocessing.get('std', IMAGENET_DEFAULT_STD))
    if native_size:
        return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    if not preprocessing:
        return build_eval_transform(cfg.DATA.IMG_SIZE, interpolation=cfg.DATA.INTERPOLATION, crop=cfg.TEST.CROP,
                                    fast=False)[0]
    from timm.data import create_transform
    height, width = img_size_hw(cfg.DATA.IMG_SIZE)
    return create_transform((3, height, width), is_training=False, mean=mean, std=std,
                            interpolation=preprocessing.get('interpolation', cfg.DATA.INTERPOLATION),
                            crop_pct=preprocessing.get('crop_pct', 0.875 if cfg.TEST.CROP else 1.0),
                            crop_mode=preprocessing.get('crop_mode', 'center'))


def main(args: argparse.Namespace) -> None:
    files = image_files(args.images)  # a wrong path is the one line, before any weights are read
    snapshot, saved = read_for_use(args.weights)
    print(f"weights: {snapshot.describe()}", file=sys.stderr)
    if snapshot.layout.name == 'simmim':
        raise UserError(f"{args.weights} is a SimMIM pre-training checkpoint (no classifier): fine-tune it "
                        "first with main_simmim_ft.py --pretrained")
    cfg = build_config(args, saved, snapshot)
    device = _device(args.device)
    if cfg.HOST_MEMORY_CACHE and device.type == 'cpu':
        keep_freed_memory()
    model = build_model(cfg, device=device)
    load_converted(model, snapshot.state, snapshot.layout, args.weights)
    model.to(device)
    names = class_names(cfg, args.data_path, snapshot.class_names)
    transform = eval_transform(cfg, snapshot.preprocessing, args.native_size)
    for path, top in predict(model, files, transform, device, args.topk, args.batch_size):
        print(path)
        for index, prob in top:
            print(f"  {100 * prob:6.2f}%  {names[index]}")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: user mistakes are one line on stderr and exit status 2."""
    return exit_status(lambda: main(parse_args(argv)))


if __name__ == '__main__':
    sys.exit(run())
