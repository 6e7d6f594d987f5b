"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans) as an ImageFolder for the demo.

    python tools/prepare_digits.py OUT_DIR [--size 32] [--val-fraction 0.2] [--seed 0]

Produces OUT_DIR/train/<digit>/*.png and OUT_DIR/val/<digit>/*.png, split per class by a fixed seed,
upscaled to RGB squares so the official pipeline reads them like any photo folder.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the split; returns the number of images written per split."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {'train': 0, 'val': 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_val = int(round(len(indices) * val_fraction))
        for split, chosen in (('val', indices[:n_val]), ('train', indices[n_val:])):
            folder = os.path.join(out_dir, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                # The scans hold 0..16 ink levels; white digits on black, as in the source.
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels, mode='L').resize((size, size), Image.BICUBIC).convert('RGB')
                image.save(os.path.join(folder, f'{i:04d}.png'))
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir')
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    counts = write_digits(args.out_dir, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out_dir}")


if __name__ == '__main__':
    main()
