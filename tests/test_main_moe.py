"""main_moe.py as the official one is used: a tiny Swin-MoE trains under ``torchrun --nproc_per_node 2`` (gloo,
one expert per rank), every rank writes its own checkpoint file, a longer run auto-resumes from them, ``--eval``
reads ``NAME.pth`` as each rank's ``NAME.pth.rank{R}``, and the official configs count the official parameters.
Validation sets that do not split evenly over the ranks evaluate (and train) as on one process, and per-rank
checkpoints load on other numbers of processes, their experts regrouped."""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from cli import run_main, torchrun, write_tiny_config
from config import get_default_config, merge_yaml
from conftest import write_image_folder, write_image_folder_with_val
from models.moe import moe_param_counts
from models.swin_transformer_moe import SwinTransformerMoE
from utils.errors import UserError
from utils.moe_checkpoint import read_rank_files

CONFIG = """\
MODEL:
  TYPE: swin_moe
  NAME: moe_test
  NUM_CLASSES: 3
  SWIN_MOE:
    EMBED_DIM: 16
    DEPTHS: [2, 2]
    NUM_HEADS: [1, 2]
    WINDOW_SIZE: 4
    MLP_FC2_BIAS: False
    INIT_STD: 0.005
    MOE_BLOCKS: [[1], [1]]
    NUM_LOCAL_EXPERTS: 1
    MOE_DROP: 0.1
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
AUG:
  AUTO_AUGMENT: none
  MIXUP: 0.0
  CUTMIX: 0.0
TRAIN:
  EPOCHS: 1
  WARMUP_EPOCHS: 0
  BASE_LR: 0.01
PRINT_FREQ: 1
"""
LAUNCH = ['--standalone', '--nproc_per_node=2']


def _moe(args, root):
    return torchrun(LAUNCH, args, root, script='main_moe.py')


def test_a_tiny_swin_moe_trains_on_2_processes_saves_per_rank_files_resumes_and_evaluates(tmp_path):
    data = write_image_folder(tmp_path / 'data', num_classes=3, train_per_class=8, val_per_class=2)
    cfg = write_tiny_config(tmp_path, CONFIG)
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(tmp_path / 'out')]
    run_dir = tmp_path / 'out' / 'moe_test' / 'default'
    first = _moe(args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert re.search(r'loss-cls \d+\.\d{4} \(\d+\.\d{4}\)\tloss-aux \d+\.\d{4} \(\d+\.\d{4}\)', log)
    files = [torch.load(run_dir / f'ckpt_epoch_0.pth.rank{r}', weights_only=True) for r in (0, 1)]
    expert = 'layers.0.blocks.1.mlp._moe_layer.experts.batched_fc1_w'
    gate = 'layers.0.blocks.1.mlp._moe_layer.gates.0.wg.weight'
    assert files[0]['model'][expert].shape[0] == 1 and files[0]['model'][gate].shape[0] == 2  # 2 experts in all
    assert not torch.equal(files[0]['model'][expert], files[1]['model'][expert])  # each rank its own expert
    assert torch.equal(files[0]['model'][gate], files[1]['model'][gate])  # the rest kept in step by DDP

    longer = _moe(args + ['--opts', 'TRAIN.EPOCHS', '2'], tmp_path)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    for r in (0, 1):
        assert f'Resuming from {run_dir}/ckpt_epoch_0.pth.rank{r}' in (run_dir / f'log_rank{r}.txt').read_text()
    assert (run_dir / 'ckpt_epoch_1.pth.rank1').exists()

    evaluated = _moe(['--eval', '--resume', str(run_dir / 'ckpt_epoch_1.pth')] + args[:4] +
                     ['--output', str(tmp_path / 'eval')], tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    eval_log = (tmp_path / 'eval' / 'moe_test' / 'default' / 'log_rank1.txt').read_text()
    assert 'ckpt_epoch_1.pth.rank1' in eval_log and ' * Acc@1 ' in eval_log

    # the release layout: experts per rank, the rest in .master; --pretrained NAME.pth merges them back
    final = {name: torch.load(run_dir / f'ckpt_epoch_final.pth.{name}', weights_only=True)['model']
             for name in ('rank0', 'rank1', 'master')}
    assert expert in final['rank1'] and gate not in final['rank1'] and gate in final['master']
    assert torch.equal(final['rank1'][expert], torch.load(run_dir / 'ckpt_epoch_1.pth.rank1',
                                                          weights_only=True)['model'][expert])
    tuned = _moe(['--eval', '--pretrained', str(run_dir / 'ckpt_epoch_final.pth')] + args[:4] +
                 ['--output', str(tmp_path / 'tuned')], tmp_path)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    tuned_log = (tmp_path / 'tuned' / 'moe_test' / 'default' / 'log_rank1.txt').read_text()
    assert 'merged' in tuned_log and 'ckpt_epoch_final.pth.master' in tuned_log and ' * Acc@1 ' in tuned_log


def test_main_moe_refuses_a_model_that_is_not_swin_moe(tmp_path):
    cfg = write_tiny_config(tmp_path)
    result = run_main(['--cfg', str(cfg), '--data-path', str(tmp_path)], tmp_path, script='main_moe.py')
    assert result.returncode == 2 and 'main_moe.py trains MODEL.TYPE swin_moe' in result.stderr
    assert 'Traceback' not in result.stderr



# INIT_STD 0.1: the experts weigh in the loss (at the official 0.005 even swapping them moves it by 1e-4 only).
# Evaluations run with CAPACITY_FACTOR 0: every token kept, so routing does not depend on how the images fall
# into batches and any split of the set gives the same figures; training keeps the official 1.25.
EXACT = CONFIG.replace('INIT_STD: 0.005', 'INIT_STD: 0.1')
NO_DROPS = ['MODEL.SWIN_MOE.CAPACITY_FACTOR', '0']
ONE_PROCESS_ALL_EXPERTS = ['MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '2']


def _figures(log: str) -> list[tuple[str, int, float]]:
    """Each validation's (Acc@ line, images counted, mean loss), in order."""
    accs = re.findall(r' \* (Acc@1 [\d.]+ Acc@5 [\d.]+)', log)
    losses = re.findall(r'validation over (\d+) images: mean loss ([\d.]+)', log)
    assert len(accs) == len(losses), log[-2000:]
    return [(acc, int(n), float(loss)) for acc, (n, loss) in zip(accs, losses)]


def _same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-5


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope='module')
def uneven(tmp_path_factory):
    """A tiny Swin-MoE trained on 2 processes (validating on 21 images: the ranks' last batches hold 3 and 2),
    then its checkpoint evaluated on 17 images (rank 0 has 3 batches, rank 1 two) and on 21, each on 2 processes
    and on 1 process holding both experts (the four evaluations side by side)."""
    root = tmp_path_factory.mktemp('moe_uneven')
    sets = {n: write_image_folder_with_val(root / f'val{n}', n) for n in (17, 21)}
    cfg = write_tiny_config(root, EXACT)
    train = ['--cfg', str(cfg), '--data-path', str(sets[21]), '--output', str(root / 'out')]
    trained = _moe(train, root)
    _ok(trained)
    run_dir = root / 'out' / 'moe_test' / 'default'

    def evaluate(n: int, processes: int):
        args = ['--eval', '--cfg', str(cfg), '--data-path', str(sets[n]), '--resume', str(run_dir / 'ckpt_epoch_0.pth'),
                '--output', str(root / f'eval{n}_{processes}'), '--opts', *NO_DROPS]
        if processes == 1:
            return run_main(args + ONE_PROCESS_ALL_EXPERTS, root, script='main_moe.py')
        return _moe(args, root)

    runs = [(n, p) for n in (17, 21) for p in (2, 1)]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = dict(zip(runs, pool.map(lambda run: evaluate(*run), runs)))
    logs = {}
    for (n, p), result in results.items():
        _ok(result)
        logs[n, p] = (root / f'eval{n}_{p}' / 'moe_test' / 'default' / 'log_rank0.txt').read_text()
    return SimpleNamespace(root=root, cfg=cfg, sets=sets, run_dir=run_dir, train_log=(run_dir / 'log_rank0.txt')
                           .read_text(), logs=logs)


def test_2_process_evaluation_of_sets_that_split_unevenly_gives_the_1_process_figures(uneven):
    # the training run validated on 21 images over 2 ranks (capacity factor 1.25, unequal last batches)
    assert [f[1] for f in _figures(uneven.train_log)] == [21]
    for n in (17, 21):
        (two,), (one,) = _figures(uneven.logs[n, 2]), _figures(uneven.logs[n, 1])
        assert two[1] == n and _same(two, one), (n, two, one)
    assert "regrouped 2 ranks' experts (1 each) into 1 rank (2 local)" in uneven.logs[17, 1]


def test_per_rank_checkpoints_load_on_other_numbers_of_processes(uneven):
    # 4 processes (each expert split over 2 of them) resume the 2-rank run: same figure as 2 processes, then
    # an epoch of training (validating 17 images: ranks of 2 and 1 batches) on the regrouped optimizer state
    resumed = torchrun(['--standalone', '--nproc_per_node=4'],
                       ['--cfg', str(uneven.cfg), '--data-path', str(uneven.sets[17]), '--output',
                        str(uneven.root / 'out'), '--opts', *NO_DROPS, 'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '-2',
                        'TRAIN.EPOCHS', '2'], uneven.root, script='main_moe.py')
    _ok(resumed)
    log = (uneven.run_dir / 'log_rank0.txt').read_text()[len(uneven.train_log):]
    assert "regrouped 2 ranks' experts (1 each) into 4 ranks (1/2 of one local); optimizer state regrouped" in log
    first, after = _figures(log)
    assert _same(first, _figures(uneven.logs[17, 2])[0]) and after[1] == 17
    assert all((uneven.run_dir / f'ckpt_epoch_1.pth.rank{r}').exists() for r in range(4))

    # the 4-rank checkpoint on 2 processes (one whole expert each): the 4-process figure
    evaluated = _moe(['--eval', '--cfg', str(uneven.cfg), '--data-path', str(uneven.sets[17]), '--resume',
                      str(uneven.run_dir / 'ckpt_epoch_1.pth'), '--output', str(uneven.root / 'eval4to2'), '--opts',
                      *NO_DROPS], uneven.root)
    _ok(evaluated)
    eval_log = (uneven.root / 'eval4to2' / 'moe_test' / 'default' / 'log_rank1.txt').read_text()
    assert "regrouped 4 ranks' experts (1/2 of one each) into 2 ranks (1 local)" in eval_log
    assert _same(_figures(eval_log)[0], after)

    # another number of experts: one line saying which NUM_LOCAL_EXPERTS fits
    model = SwinTransformerMoE(img_size=32, num_classes=3, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                               window_size=4, mlp_fc2_bias=False, moe_blocks=[[1], [1]], num_local_experts=1)
    with pytest.raises(UserError, match='checkpoint has 2 experts, this model has 1 on 1 process; to read it here '
                                        'use MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS 2'):
        read_rank_files(str(uneven.run_dir / 'ckpt_epoch_0.pth'), model, logging.getLogger('test'))

# (config, GPUs, "number of params single", "whole"): the official model's counts with 21841 classes, by the
# official main_moe.py's rule (trainable parameters; an expert counted once / for every expert of the job)
OFFICIAL_COUNTS = [
    ('swin_moe_small_patch4_window12_192_densebaseline_22k', 32, 65_757_553, 65_757_553),
    ('swin_moe_small_patch4_window12_192_8expert_32gpu_22k', 32, 65_791_345, 173_257_585),
    ('swin_moe_small_patch4_window12_192_32expert_32gpu_22k', 32, 65_892_721, 541_814_641),
    ('swin_moe_small_patch4_window12_192_cosine_router_32expert_32gpu_22k', 32, 66_923_387, 542_845_307),
    ('swin_moe_small_patch4_window12_192_64expert_64gpu_22k', 64, 66_027_889, 1_033_224_049),
    ('swin_moe_base_patch4_window12_192_16expert_32gpu_22k', 32, 109_374_161, 518_656_721),
    ('swin_moe_base_patch4_window12_192_cosine_router_32expert_32gpu_22k', 32, 110_810_331, 956_660_955),
]


@pytest.mark.parametrize('name, gpus, single, whole', OFFICIAL_COUNTS)
def test_the_official_configs_have_the_official_parameter_counts(name, gpus, single, whole):
    config = get_default_config()
    merge_yaml(config, f'configs/swinmoe/{name}.yaml')
    sub = config.MODEL.SWIN_MOE
    with torch.device('meta'):
        model = SwinTransformerMoE(
            img_size=config.DATA.IMG_SIZE, num_classes=21841, embed_dim=sub.EMBED_DIM, depths=sub.DEPTHS,
            num_heads=sub.NUM_HEADS, window_size=sub.WINDOW_SIZE, mlp_fc2_bias=sub.MLP_FC2_BIAS,
            moe_blocks=sub.MOE_BLOCKS, num_local_experts=sub.NUM_LOCAL_EXPERTS, cosine_router=sub.COSINE_ROUTER,
            expert_world_size=gpus)
    assert moe_param_counts(model) == (single, whole)
