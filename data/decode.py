"""Turning the stored bytes of an image into pixels: PIL and uint8 tensor decoders, reduced JPEG decoding.

Every decoder decodes the whole image at once (at full or reduced scale), so that a truncated or
corrupt file fails here, where the dataset can count it and substitute another sample, and never
later inside a transform. Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone: a
truncated file is unreadable, not grey.

Input of other channel counts than 3 (MODEL.*.IN_CHANS) goes through :class:`ChannelDecoder` instead,
to float32 tensors in [0, 1] (8-bit values over 255, 16-bit ones over 65535: full depth is kept).

Reduced decoding (Pillow's ``draft``) lets libjpeg produce the image at 1/2, 1/4 or 1/8 of its size
straight from the DCT coefficients, several times faster than a full decode. The transforms use it
only for training crops that stay at least twice the output size on each side once reduced (see
``data.transforms.RandomResizedCropDecoder``).
"""
from __future__ import annotations

import io
import warnings
from importlib import metadata
from typing import Optional

import numpy as np
import PIL
import torch
from PIL import Image, ImageSequence
from torchvision.transforms.functional import pil_to_tensor

from config import img_size_hw

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision >= 0.29 deprecates its decoders; without them Pillow decodes everything
    decode_jpeg = None

_JPEG_MAGIC = b'\xff\xd8\xff'
JPEG_REDUCTIONS = (8, 4, 2)  # the scales libjpeg can decode at, besides 1


def _simd_build() -> bool:
    """True when the installed PIL package is Pillow-SIMD (its distribution's version is PIL's own)."""
    for name in ('pillow-simd', 'Pillow-SIMD'):
        try:
            if metadata.version(name) == PIL.__version__:
                return True
        except metadata.PackageNotFoundError:
            pass
    return False


PIL_SIMD = _simd_build()


def pillow_build() -> str:
    """``'Pillow-SIMD 12.1.1.post0'`` or ``'Pillow 13.0.0'``: the PIL build in use, for logs and benchmarks."""
    return f'{"Pillow-SIMD" if PIL_SIMD else "Pillow"} {PIL.__version__}'


def open_image(data: bytes) -> Image.Image:
    """The image with its header read and no pixel decoded yet (size, mode and format are known)."""
    return Image.open(io.BytesIO(data))


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image (raises on a truncated or corrupt file) and return it in RGB."""
    img.load()
    return img if img.mode == 'RGB' else img.convert('RGB')


def decode_pil(data: bytes) -> Image.Image:
    """An RGB PIL image; raises (OSError, SyntaxError, ...) when the bytes are not a full image."""
    return load_rgb(open_image(data))


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


# Start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15): the segment that gives the image size.
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` of a JPEG from its frame header, or None when ``data`` is not a JPEG whose
    header reads plainly (then Pillow's parser decides).

    Walks the marker segments up to the frame header: tens of microseconds less than opening the
    file with Pillow, whose header parsing (quantisation tables included) runs in Python.
    """
    if bytes(data[:3]) != _JPEG_MAGIC:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a segment
            pos += 2
        elif marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height, width = int.from_bytes(data[pos + 5:pos + 7], 'big'), int.from_bytes(data[pos + 7:pos + 9], 'big')
            return (width, height) if width and height else None
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return None


def jpeg_reduction(max_factor: float) -> int:
    """The largest JPEG decoding reduction (8, 4, 2, or 1 for none) not above ``max_factor``."""
    return next((k for k in JPEG_REDUCTIONS if k <= max_factor), 1)


def draft_reduce(img: Image.Image, factor: int) -> float:
    """Make an opened JPEG decode at ``1 / factor`` of its size; returns the scale actually set
    (original pixels per decoded pixel: 1.0 when Pillow declines, e.g. for a multi-tile file)."""
    if factor <= 1:
        return 1.0
    width, height = img.size
    reduced = img.draft('RGB', (width // factor, height // factor))
    if not reduced:
        return 1.0
    return width / reduced[1][2]  # draft reports where the full image lies in decoded pixels


# ---------------------------------------------------------------------------------- other channel counts
NPY_MAGIC = b'\x93NUMPY'
_DEEP_MODES = frozenset(('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'))  # 16-bit, 32-bit int and float grey
_BAND_MODES = frozenset(('L', 'LA', 'RGB', 'RGBA', 'CMYK'))  # 8-bit modes read band by band as they are
_LEVELS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}


def unit_range(pixels: np.ndarray) -> torch.Tensor:
    """An integer or float array as float32 in [0, 1]: uint8 over 255, uint16 (and Pillow's 32-bit integer
    grey, which 16-bit PNGs open as on older Pillow) over 65535, floats as they are."""
    dtype = pixels.dtype.newbyteorder('=')  # big-endian 16-bit TIFFs and arrays: the native type
    if dtype.kind == 'f':
        return torch.from_numpy(np.asarray(pixels, dtype=np.float32))
    levels = _LEVELS.get(dtype, 65535.0 if dtype == np.dtype(np.int32) else None)
    if levels is None:
        raise ValueError(f'pixels of type {pixels.dtype} (expected uint8, uint16 or float)')
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32)).div_(levels)


def _page_planes(page: Image.Image) -> list[np.ndarray]:
    """The channel planes of one decoded Pillow image: 16-bit and float pages as one plane at full depth,
    multi-band ones (RGB, RGBA, LA, CMYK) band by band, palettes and bilevel through RGB or L."""
    if page.mode in _DEEP_MODES or page.mode in _BAND_MODES:
        pixels = np.asarray(page)
    else:
        pixels = np.asarray(page.convert('L' if len(page.getbands()) == 1 and page.mode != 'P' else 'RGB'))
    return [pixels] if pixels.ndim == 2 else list(np.moveaxis(pixels, -1, 0))


class ChannelDecoder:
    """bytes -> float32 ``(channels, H, W)`` in [0, 1]: the decoder of input that is not 3-channel RGB.

    * ``channels == 1``: Pillow's greyscale ('L': colour images by their luma); 16-bit PNG/TIFF at full
      depth (over 65535), float TIFF as stored;
    * other counts: the bands of the image (e.g. RGBA for 4), a multi-page TIFF page after page (each page
      one or more channels, 8 or 16 bits), or a NumPy ``.npy`` array (any count, also 1): ``(H, W, C)``, or
      ``(C, H, W)`` when its last axis is not ``C``; uint8, uint16, bool or float (taken as already in [0, 1]).

    A file with another number of channels is unreadable (counted and replaced like a corrupt one, its
    reason logged).
    """

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, data: bytes) -> torch.Tensor:
        if bytes(data[:len(NPY_MAGIC)]) == NPY_MAGIC:
            pixels = unit_range(self._array(np.load(io.BytesIO(data), allow_pickle=False)))
        else:
            pixels = torch.stack([unit_range(p) for p in self._planes(open_image(data))])
        if pixels.shape[0] != self.channels:
            raise ValueError(f'{pixels.shape[0]} channels, the model takes {self.channels} (IN_CHANS)')
        return pixels.contiguous()

    def _planes(self, img: Image.Image) -> list[np.ndarray]:
        img.load()  # a truncated or corrupt file fails here
        if self.channels == 1:
            return [np.asarray(img if img.mode in _DEEP_MODES else img.convert('L'))]
        if img.format != 'TIFF' or getattr(img, 'n_frames', 1) == 1:
            return _page_planes(img)
        return [plane for page in ImageSequence.Iterator(img) for plane in _page_planes(page)]

    def _array(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim == 2:
            return pixels[None]
        if pixels.ndim == 3 and pixels.shape[-1] == self.channels:
            return np.moveaxis(pixels, -1, 0)
        if pixels.ndim == 3:
            return pixels
        raise ValueError(f'an array of shape {pixels.shape} (expected (H, W), (H, W, C) or (C, H, W))')

    def blank(self, size) -> torch.Tensor:
        """A black ``(channels, H, W)`` image of ``size`` (a side or (H, W))."""
        return torch.zeros(self.channels, *img_size_hw(size))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(channels={self.channels})'


def blank_image(decoder, size) -> object:
    """A black stand-in of ``size`` (a side or (H, W)) of the decoder's output type (unreadable validation images)."""
    if isinstance(decoder, ChannelDecoder):
        return decoder.blank(size)
    height, width = img_size_hw(size)
    if decoder is decode_tensor:
        return torch.zeros(3, height, width, dtype=torch.uint8)
    return Image.new('RGB', (width, height))
