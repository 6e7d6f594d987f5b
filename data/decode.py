"""Turning the stored bytes of an image into pixels: a PIL decoder and a uint8 tensor decoder.

Both decode the whole image at once, so that a truncated or corrupt file fails here, where the
dataset can count it and substitute another sample, and never later inside a transform. Pillow's
global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone: a truncated file is unreadable, not grey.
"""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision >= 0.29 deprecates its decoders; without them Pillow decodes everything
    decode_jpeg = None

_JPEG_MAGIC = b'\xff\xd8\xff'


def decode_pil(data: bytes) -> Image.Image:
    """An RGB PIL image; raises (OSError, SyntaxError, ...) when the bytes are not a full image."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert('RGB')


def decode_tensor(data: bytes) -> torch.Tensor:
    """A uint8 RGB tensor of shape (3, H, W).

    JPEGs go through torchvision's libjpeg-turbo decoder straight into a tensor (no PIL image and
    no copy into a PIL buffer); anything it refuses (other formats, exotic JPEGs) falls back to
    Pillow, so a file is unreadable here exactly when Pillow cannot read it either.
    """
    if decode_jpeg is not None and bytes(data[:3]) == _JPEG_MAGIC:
        try:
            # torchvision 0.29 warns on every call; the decoder still works, and once it is removed
            # Pillow takes over (import above), so that one warning is silenced (cost: microseconds).
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                # bytearray: decode_jpeg wants a writable buffer; the copy is a few microseconds.
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    return pil_to_tensor(decode_pil(data))


def blank_image(decoder, size: int) -> object:
    """A black ``size`` x ``size`` stand-in of the decoder's output type (unreadable validation images)."""
    if decoder is decode_tensor:
        return torch.zeros(3, size, size, dtype=torch.uint8)
    return Image.new('RGB', (size, size))
