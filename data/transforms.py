"""The official augmentation recipe through timm, a faster equivalent, and batch-level finishing.

Two training paths with the same distribution of crops and augmentations:

* plain (``DATA.FAST_LOADER False``): timm's ``create_transform`` exactly as the official framework
  calls it; each worker returns normalised float tensors.
* fast: JPEGs decoded by torchvision into uint8 tensors, random-resized-crop and flip on the tensor,
  timm's own PIL RandAugment / colour jitter (the same objects timm builds; they are faster on PIL
  than tensor versions), then a uint8 tensor out. :class:`BatchNormalize` turns the batch into
  normalised floats and applies random erasing once per batch, in the loader's collate (workers).

Both paths rebind timm's posterize to :func:`safe_posterize`, see there.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data import auto_augment as timm_aa
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .decode import decode_pil, decode_tensor

_TENSOR_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest')


# ---------------------------------------------------------------------------------- posterize
def safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel, 0 bits included.

    timm's RandAugment with ``inc1`` maps the top magnitude (m9 + noise, clipped at 10) to 0 bits.
    Pillow up to 12 posterized that to a black image; Pillow 13 raises "bits must be between or
    equal to 1 and 8" inside a loader worker, which kills the official recipe in epoch 0. We keep
    the released behaviour (0 bits -> black) rather than clamping to 1 bit, so the augmentation
    strength is exactly what the recipe was tuned with; for 1-7 bits this equals ImageOps.posterize.
    """
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def use_safe_posterize(transform: Any) -> int:
    """Point every timm posterize op inside ``transform`` at :func:`safe_posterize`; return how many.

    Only these op instances change (their ``aug_fn`` attribute): timm's module, and any other
    transform built from it in the process, stay untouched, unlike a global monkeypatch.
    """
    if isinstance(transform, timm_aa.AugmentOp):
        if transform.aug_fn is timm_aa.posterize:
            transform.aug_fn = safe_posterize
            return 1
        return 0
    if isinstance(transform, (list, tuple)):
        return sum(use_safe_posterize(t) for t in transform)
    return sum(use_safe_posterize(getattr(transform, name)) for name in ('transforms', 'ops', 'policy')
               if isinstance(getattr(transform, name, None), (list, tuple)))


# ---------------------------------------------------------------------------------- training
def _timm_train(img_size: int, interpolation: str, color_jitter: float, auto_augment: Optional[str],
                re_prob: float, re_mode: str, re_count: int, separate: bool):
    return create_transform(
        input_size=img_size, is_training=True, color_jitter=color_jitter if color_jitter > 0 else None,
        auto_augment=auto_augment if auto_augment and auto_augment != 'none' else None,
        re_prob=re_prob, re_mode=re_mode, re_count=re_count, interpolation=interpolation, separate=separate)


class TensorRandomResizedCrop:
    """RandomResizedCrop of a uint8 (3, H, W) tensor to (3, size, size).

    Crop boxes come from torchvision's ``RandomResizedCrop.get_params``, the same distribution as
    timm's PIL version. The patch is resized in channels-last layout, where torch has fast uint8
    antialiased kernels (~5x faster than PIL's resize here); the result keeps that layout, so it
    becomes a PIL image without a strided copy.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = 'bicubic'):
        self.size, self.scale, self.ratio, self.mode = (size, size), scale, ratio, interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        patch = img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        if self.mode == 'nearest':  # torch's 'nearest' is off by half a pixel; 'nearest-exact' is PIL's
            return F.interpolate(patch, size=self.size, mode='nearest-exact')[0]
        return F.interpolate(patch, size=self.size, mode=self.mode, antialias=True, align_corners=False)[0]

    def __repr__(self) -> str:
        return f'{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, mode={self.mode})'


class FastTrainTransform:
    """uint8 tensor -> crop -> horizontal flip -> PIL RandAugment / colour jitter -> uint8 (3, H, W)."""

    def __init__(self, crop: Callable, secondary: Optional[Callable], hflip: float = 0.5):
        self.crop, self.secondary, self.hflip = crop, secondary, hflip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.crop(image)
        flip = torch.rand(1).item() < self.hflip
        if self.secondary is None:
            return image.flip(-1) if flip else image
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_uint8(self.secondary(pil))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(crop={self.crop}, hflip={self.hflip}, secondary={self.secondary})'


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A (3, H, W) uint8 view of an RGB image (one NumPy copy, no per-pixel Python work)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class PilToUint8:
    """Transform form of :func:`pil_to_uint8` (ends the PIL pipelines of the fast path)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(image)


def build_train_transform(img_size: int, interpolation: str = 'bicubic', color_jitter: float = 0.4,
                          auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1', re_prob: float = 0.25,
                          re_mode: str = 'pixel', re_count: int = 1, fast: bool = True
                          ) -> tuple[Callable, Callable, Optional['BatchNormalize']]:
    """``(transform, decoder, batch_finish)`` for training; ``batch_finish`` is None on the plain path.

    Images of at most 32 px use a random crop with 4 px of padding instead of the random resized crop
    (as the official framework does for CIFAR-sized inputs).
    """
    args = (img_size, interpolation, color_jitter, auto_augment, re_prob, re_mode, re_count)
    small = img_size <= 32
    if not fast:
        transform = _timm_train(*args, separate=False)
        if small:
            transform.transforms[0] = T.RandomCrop(img_size, padding=4)
        use_safe_posterize(transform)
        return transform, decode_pil, None
    primary, secondary, _ = _timm_train(*args, separate=True)
    use_safe_posterize(secondary)
    erasing = BatchRandomErasing(re_prob, re_mode, re_count) if re_prob > 0 else None
    if interpolation in _TENSOR_INTERPOLATIONS or small:
        crop = v2.RandomCrop(img_size, padding=4) if small else TensorRandomResizedCrop(
            img_size, interpolation=interpolation)
        transform = FastTrainTransform(crop, secondary if secondary.transforms else None)
        return transform, decode_tensor, BatchNormalize(erasing=erasing)
    # Interpolations only PIL has ('random', 'lanczos', ...): timm's PIL crop, uint8 output.
    return T.Compose([primary, secondary, PilToUint8()]), decode_pil, BatchNormalize(erasing=erasing)


# ---------------------------------------------------------------------------------- evaluation
def build_eval_transform(img_size: int, interpolation: str = 'bicubic', crop: bool = True, fast: bool = True
                         ) -> tuple[Callable, Callable, Optional['BatchNormalize']]:
    """``(transform, decoder, batch_finish)``: resize to ``int(256 / 224 * size)`` and centre-crop
    (or resize to the square when ``crop`` is off); images of at most 32 px are used as they are.

    Both paths compute the same float32 operations (``/255``, ``-mean``, ``/std``), so their batches
    are bitwise identical; the fast one runs them in the collate, on uint8 images.
    """
    try:
        mode = InterpolationMode(interpolation)
    except ValueError:  # e.g. timm's 'random': bilinear, as the official framework falls back to
        mode = InterpolationMode.BILINEAR
    steps: list[Callable] = []
    if img_size > 32:
        if crop:
            steps += [T.Resize(int(256 / 224 * img_size), interpolation=mode), T.CenterCrop(img_size)]
        else:
            steps += [T.Resize((img_size, img_size), interpolation=mode)]
    if fast:
        return T.Compose(steps + [PilToUint8()]), decode_pil, BatchNormalize()
    steps += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(steps), decode_pil, None


# ---------------------------------------------------------------------------------- batch finishing
class BatchRandomErasing:
    """timm's RandomErasing (same parameters and distribution), once over a normalised batch.

    Draws come from generators seeded per batch, not from the process's global ones, so a batch's
    erasing is reproducible from its seed alone.
    """

    def __init__(self, probability: float = 0.25, mode: str = 'pixel', max_count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        self.probability, self.mode = probability, mode.lower()
        self.max_count = max(1, max_count)
        self.area_range = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        _, chans, height, width = batch.shape
        for image in batch:
            if rnd.random() > self.probability:
                continue
            count = rnd.randint(1, self.max_count) if self.max_count > 1 else 1
            for _ in range(count):
                self._erase_one(image, chans, height, width, count, rnd, gen)
        return batch

    def _erase_one(self, image, chans, height, width, count, rnd, gen) -> None:
        for _ in range(10):
            area = rnd.uniform(*self.area_range) * height * width / count
            aspect = math.exp(rnd.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
                image[:, top:top + h, left:left + w] = self._fill(chans, h, w, gen)
                return

    def _fill(self, chans: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        if self.mode == 'pixel':
            return torch.randn((chans, h, w), generator=gen)
        if self.mode == 'rand':
            return torch.randn((chans, 1, 1), generator=gen)
        return torch.zeros((chans, 1, 1))


class BatchNormalize:
    """uint8 (B, 3, H, W) -> normalised float32, then optional random erasing (seeded per batch)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 erasing: Optional[BatchRandomErasing] = None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.erasing = erasing

    def __call__(self, images: Sequence[torch.Tensor], seed: int = 0,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalise ``images`` (a batch or a list of (3, H, W) tensors) into ``out`` (or a new tensor)."""
        if out is None:
            out = torch.empty((len(images), *images[0].shape), dtype=torch.float32)
        # One image at a time: its float copy stays in cache through the three passes, about three
        # times faster than the same passes over a whole batch in main memory.
        for dst, src in zip(out, images):
            dst.copy_(src)
            dst.div_(255).sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            self.erasing(out, seed)
        return out
