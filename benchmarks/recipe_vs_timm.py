"""Our main.py against timm's own train.py: same photos, same tiny Swin, same official recipe.

Writes the small real photo set of :mod:`benchmarks.photo_set` (or uses ``--data``), trains a small
Swin with ``python main.py --cfg configs/swin_tiny.yaml --opts ...`` and, when ``--timm-train`` points
at a copy of timm's ``train.py`` (it is not part of the timm wheel), trains the same architecture
with it under the same recipe. Then prints final and best top-1 of each run, the difference, and
checks that our output folder holds checkpoints, the log, config.json and TensorBoard events.

    .venv/bin/python benchmarks/recipe_vs_timm.py --timm-train /tmp/timm_train/train.py --seeds 0 1

The recipe (both sides): RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0 (switch 0.5),
random erasing 0.25 pixel, label smoothing 0.1, AdamW (wd 0.05, no decay on norms, biases and
relative position tables), cosine per iteration with a linear warm-up in front of it, grad clip
5.0 (global norm), drop path 0.2, bicubic resizing, val resize to size/0.875 and centre crop,
float32. The learning rate is given after scaling (``--lr``): ours gets BASE_LR = lr * 512 / batch,
so the official linear rule lands on it, and WARMUP_LR / MIN_LR scale likewise; timm gets the
scaled numbers directly. timm's scheduler counts its cosine from after the warm-up when given
``--warmup-prefix``, but then trains warm-up + ``--epochs`` epochs, so it is given epochs - warm-up:
the per-iteration lr curve is then the official one.

timm's train.py is started through a two-line shim that points timm's posterize op at a Pillow-13
safe version (0 bits -> black, what Pillow <= 12 did); without it timm's RandAugment 'inc1' raises in
a loader worker on Pillow 13. Ours does the same internally (data.augment_ops.safe_posterize).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.photo_set import write_photo_set  # noqa: E402

MODEL_NAME = 'swin_tiny_patch4_window7_224'
OFFICIAL_BATCH = 512  # the official rule: lr = BASE_LR * total batch / 512

# Runs in the child before timm's train.py: rebinds timm's posterize ops (see the module docstring).
TIMM_SHIM = """\
import runpy, sys
from PIL import Image, ImageOps
import timm.data.auto_augment as aa
def posterize(img, bits_to_keep, **_):
    bits = int(bits_to_keep)
    return img if bits >= 8 else Image.new(img.mode, img.size) if bits <= 0 else ImageOps.posterize(img, bits)
for name, fn in list(aa.NAME_TO_OP.items()):
    if fn is aa.posterize:
        aa.NAME_TO_OP[name] = posterize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@dataclass
class Recipe:
    """The knobs both sides are given; everything else is the official default on both."""
    img_size: int = 64
    classes: int = 5
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 4
    epochs: int = 30
    warmup_epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3  # after scaling
    drop_path: float = 0.2
    workers: int = 2

    @property
    def scale(self) -> float:
        return self.batch_size / OFFICIAL_BATCH

    @property
    def warmup_lr(self) -> float:
        return 5e-7 * self.scale  # official TRAIN.WARMUP_LR, scaled

    @property
    def min_lr(self) -> float:
        return 5e-6 * self.scale  # official TRAIN.MIN_LR, scaled


@dataclass
class RunResult:
    """One training run: per-epoch val top-1, parameter count, wall time, exit status."""
    name: str
    seed: int
    top1: list[float] = field(default_factory=list)
    params: int | None = None
    seconds: float = 0.0
    returncode: int = 0

    @property
    def final(self) -> float:
        return self.top1[-1] if self.top1 else float('nan')

    @property
    def best(self) -> float:
        return max(self.top1) if self.top1 else float('nan')


# ---------------------------------------------------------------------------------- commands
def ours_command(r: Recipe, data: Path, out: Path, seed: int, extra_opts: tuple[str, ...] = ()) -> list[str]:
    """``python main.py --cfg configs/swin_tiny.yaml --opts ...``: the issue's launch line, fp32."""
    lists = lambda xs: '[' + ', '.join(str(x) for x in xs) + ']'  # noqa: E731
    return [sys.executable, 'main.py', '--cfg', 'configs/swin_tiny.yaml', '--data-path', str(data),
            '--output', str(out), '--tag', f'seed{seed}', '--disable_amp', '--opts',
            'MODEL.NUM_CLASSES', str(r.classes), 'DATA.IMG_SIZE', str(r.img_size),
            'MODEL.SWIN.EMBED_DIM', str(r.embed_dim), 'MODEL.SWIN.DEPTHS', lists(r.depths),
            'MODEL.SWIN.NUM_HEADS', lists(r.num_heads), 'MODEL.SWIN.WINDOW_SIZE', str(r.window_size),
            'MODEL.DROP_PATH_RATE', str(r.drop_path), 'TRAIN.EPOCHS', str(r.epochs),
            'TRAIN.WARMUP_EPOCHS', str(r.warmup_epochs), 'TRAIN.BASE_LR', repr(r.lr / r.scale),
            'DATA.BATCH_SIZE', str(r.batch_size), 'DATA.NUM_WORKERS', str(r.workers), 'SEED', str(seed),
            *extra_opts]


def timm_command(r: Recipe, train_py: Path, data: Path, out: Path, seed: int) -> list[str]:
    """timm's train.py (through the posterize shim) with the same architecture and recipe."""
    tup = lambda xs: '(' + ','.join(str(x) for x in xs) + ')'  # noqa: E731
    return [sys.executable, '-c', TIMM_SHIM, str(train_py), '--data-dir', str(data),
            '--train-split', 'train', '--val-split', 'val', '--model', MODEL_NAME,
            '--model-kwargs', f'img_size={r.img_size}', f'embed_dim={r.embed_dim}', f'depths={tup(r.depths)}',
            f'num_heads={tup(r.num_heads)}', f'window_size={r.window_size}',
            '--num-classes', str(r.classes), '--img-size', str(r.img_size), '--crop-pct', '0.875',
            '--interpolation', 'bicubic', '--train-interpolation', 'bicubic', '-b', str(r.batch_size),
            '--sched', 'cosine', '--sched-on-updates', '--warmup-prefix',
            '--epochs', str(r.epochs - r.warmup_epochs), '--warmup-epochs', str(r.warmup_epochs),
            '--lr', repr(r.lr), '--warmup-lr', repr(r.warmup_lr), '--min-lr', repr(r.min_lr),
            '--opt', 'adamw', '--weight-decay', '0.05', '--clip-grad', '5.0',
            '--aa', 'rand-m9-mstd0.5-inc1', '--color-jitter', '0.4', '--reprob', '0.25', '--remode', 'pixel',
            '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--drop-path', str(r.drop_path),
            '-j', str(r.workers), '--device', 'cpu', '--no-prefetcher', '--seed', str(seed),
            '--output', str(out), '--experiment', f'seed{seed}', '--checkpoint-hist', '1', '--log-interval', '10']


def run_logged(cmd: list[str], log_path: Path) -> tuple[int, float]:
    """Run ``cmd`` from the repo root with its output in ``log_path``; (return code, seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):  # a plain single-process run on both sides
        env.pop(key, None)
    start = time.time()
    with open(log_path, 'w') as log:
        log.write(' '.join(_quote(c) for c in cmd) + '\n\n')
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode, time.time() - start


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r'[\w./=:,+-]+', arg) else "'" + arg.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------- parsing
def parse_ours(log_text: str) -> tuple[list[float], int | None]:
    """Per-epoch top-1 from ' * Acc@1 x Acc@5 y' lines, and 'number of params: n'."""
    top1 = [float(m) for m in re.findall(r' \* Acc@1 ([\d.]+) Acc@5 [\d.]+', log_text)]
    params = re.search(r'number of params: (\d+)', log_text)
    return top1, int(params.group(1)) if params else None


def parse_timm(summary_csv: Path, log_text: str) -> tuple[list[float], int | None]:
    """Per-epoch top-1 from timm's summary.csv ('eval_top1'), and 'param count:n' from its log."""
    top1 = []
    if summary_csv.is_file():
        with open(summary_csv) as f:
            top1 = [float(row['eval_top1']) for row in csv.DictReader(f)]
    params = re.search(r'param count:\s*(\d+)', log_text)
    return top1, int(params.group(1)) if params else None


def check_our_outputs(run_dir: Path, epochs: int) -> dict[str, bool]:
    """What the issue asks to find in our output folder."""
    ckpts = sorted(run_dir.glob('ckpt_epoch_*.pth'))
    return {
        f'ckpt_epoch_*.pth ({len(ckpts)} files, last ckpt_epoch_{epochs - 1}.pth)':
            (run_dir / f'ckpt_epoch_{epochs - 1}.pth').is_file(),
        'log_rank0.txt': (run_dir / 'log_rank0.txt').is_file(),
        'config.json': (run_dir / 'config.json').is_file(),
        'TensorBoard events.out.tfevents.*': bool(list(run_dir.rglob('events.out.tfevents.*'))),
    }


# ---------------------------------------------------------------------------------- the runs
def run_ours(r: Recipe, data: Path, work: Path, seed: int,
             extra_opts: tuple[str, ...] = ()) -> tuple[RunResult, dict[str, bool]]:
    out = work / 'ours'
    run_dir = out / MODEL_NAME / f'seed{seed}'
    shutil.rmtree(run_dir, ignore_errors=True)  # start fresh: main.py would auto-resume
    code, seconds = run_logged(ours_command(r, data, out, seed, extra_opts), work / f'ours_seed{seed}.log')
    log = run_dir / 'log_rank0.txt'
    top1, params = parse_ours(log.read_text() if log.is_file() else '')
    return RunResult('ours', seed, top1, params, seconds, code), check_our_outputs(run_dir, r.epochs)


def run_timm(r: Recipe, train_py: Path, data: Path, work: Path, seed: int) -> RunResult:
    out = work / 'timm'
    shutil.rmtree(out / f'seed{seed}', ignore_errors=True)
    log_path = work / f'timm_seed{seed}.log'
    code, seconds = run_logged(timm_command(r, train_py, data, out, seed), log_path)
    top1, params = parse_timm(out / f'seed{seed}' / 'summary.csv', log_path.read_text())
    return RunResult('timm', seed, top1, params, seconds, code)


def print_table(results: list[RunResult]) -> None:
    print(f"\n{'run':<6} {'seed':>4} {'epochs':>6} {'final top-1':>11} {'best top-1':>10} {'params':>8} "
          f"{'minutes':>7}  rc")
    for res in results:
        print(f"{res.name:<6} {res.seed:>4} {len(res.top1):>6} {res.final:>11.2f} {res.best:>10.2f} "
              f"{res.params or 0:>8} {res.seconds / 60:>7.1f}  {res.returncode}")
    by_name: dict[str, list[RunResult]] = {}
    for res in results:
        if res.top1:  # a run that crashed before its first evaluation has nothing to average
            by_name.setdefault(res.name, []).append(res)
    means = {}
    for name, runs in by_name.items():
        finals, bests = [x.final for x in runs], [x.best for x in runs]
        spread = f" (min {min(finals):.2f}, max {max(finals):.2f})" if len(runs) > 1 else ''
        means[name] = (statistics.fmean(finals), statistics.fmean(bests))
        print(f"{name:<6} mean over {len(runs)} seed(s): final {means[name][0]:.2f}{spread}, best {means[name][1]:.2f}")
    if 'ours' in means and 'timm' in means:
        print(f"difference ours - timm: final {means['ours'][0] - means['timm'][0]:+.2f}, "
              f"best {means['ours'][1] - means['timm'][1]:+.2f} points")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, help='an ImageFolder with train/ and val/ (default: write the photo set)')
    p.add_argument('--work', type=Path, default=Path('/tmp/recipe_vs_timm'), help='logs and outputs go here')
    p.add_argument('--timm-train', type=Path, help="a copy of timm's train.py; without it only ours runs")
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--only', choices=['ours', 'timm'], help='run one side only')
    p.add_argument('--ours-opts', nargs='*', default=[], metavar='KEY VALUE',
                   help='more --opts for our run, e.g. DATA.FAST_LOADER False (timm-identical PIL pipeline)')
    p.add_argument('--train-per-class', type=int, default=80)
    p.add_argument('--val-per-class', type=int, default=40)
    for name, default in vars(Recipe()).items():
        if not isinstance(default, tuple):
            p.add_argument('--' + name.replace('_', '-'), type=type(default), default=default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(Recipe()) if hasattr(args, k)})
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.work / 'photo_set'
        shutil.rmtree(data, ignore_errors=True)
        counts = write_photo_set(data, recipe.classes, args.train_per_class, args.val_per_class, recipe.img_size)
        print(f"photo set: {counts['train']} train / {counts['val']} val images in {data}")
    print(f"recipe: {recipe}  (scaled lr {recipe.lr:g}, warmup lr {recipe.warmup_lr:g}, min lr {recipe.min_lr:g})")
    results: list[RunResult] = []
    ok = True
    for seed in args.seeds:
        if args.only != 'timm':
            res, outputs = run_ours(recipe, data, args.work, seed, tuple(args.ours_opts))
            results.append(res)
            print(f"ours seed {seed}: rc {res.returncode}, {res.seconds / 60:.1f} min, final {res.final:.2f}")
            for what, present in outputs.items():
                print(f"  output folder has {what}: {'yes' if present else 'NO'}")
            ok &= res.returncode == 0 and all(outputs.values())
        if args.only != 'ours' and args.timm_train:
            res = run_timm(recipe, args.timm_train.resolve(), data, args.work, seed)
            results.append(res)
            print(f"timm seed {seed}: rc {res.returncode}, {res.seconds / 60:.1f} min, final {res.final:.2f}")
            ok &= res.returncode == 0
    print_table(results)
    print(f"logs: {args.work}/ours_seed*.log, {args.work}/timm_seed*.log")
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
