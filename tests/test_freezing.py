"""TRAIN.FROZEN_STAGES and TRAIN.HEAD_ONLY (a linear probe): frozen parameters get no gradient and no optimizer
state after real steps, frozen stages stay in eval mode, DDP needs no find_unused_parameters, checkpoints keep
every weight and a resumed frozen run continues exactly. In-process, a tiny Swin on the CPU path."""
from __future__ import annotations

import logging

import pytest
import torch

from config import get_default_config
from data.samplers import mix_seed
from engine import TrainContext, train_one_epoch
from models import build_model
from trainer import CLASSIFICATION, describe_frozen, prepare_training, wrap_model
from utils.checkpoint import TrainingState, build_checkpointer
from utils.distributed import DistEnv
from utils.errors import UserError
from utils.rng import seed_process

LOG = logging.getLogger('test_freezing')
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device('cpu'))
FROZEN_PREFIXES = {'stages': ('patch_embed.', 'layers.0.'), 'head_only': ('patch_embed.', 'layers.', 'norm.')}


def _cfg(tmp_path, freeze: str, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = get_default_config()
    cfg.OUTPUT = str(tmp_path)
    cfg.DATA.IMG_SIZE = 32
    cfg.MODEL.NUM_CLASSES = 3
    cfg.MODEL.DROP_PATH_RATE = 0.2  # drawn in the stages that train, off in the frozen ones
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS = 16, [1, 1], [1, 2]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    cfg.AMP_ENABLE = False
    cfg.PRINT_FREQ = 100
    cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.EPOCHS = 1e-2, 0, 2
    if freeze == 'stages':
        cfg.TRAIN.FROZEN_STAGES = 1
    elif freeze == 'head_only':
        cfg.TRAIN.HEAD_ONLY = True
    for key, value in train.items():
        setattr(cfg.TRAIN, key, value)
    cfg.freeze()
    return cfg


def _batches(n: int = 2) -> list:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(n)]


def _prepare(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    run = prepare_training(cfg, CPU, model, 2, CLASSIFICATION, LOG)
    ctx = TrainContext(model=run.model, criterion=torch.nn.CrossEntropyLoss(), optimizer=run.optimizer,
                       lr_scheduler=run.lr_scheduler, loss_scaler=run.scaler, device=CPU.device, amp_dtype=None)
    return model, run, ctx


def _epoch(cfg, ctx, epoch: int) -> None:
    seed_process(mix_seed(cfg.SEED, epoch, 0))  # as Trainer.fit: each epoch's draws depend on (seed, epoch, rank)
    train_one_epoch(cfg, ctx, _batches(), epoch, LOG)


@pytest.mark.parametrize('freeze', ['stages', 'head_only'])
def test_frozen_parameters_get_no_gradient_no_optimizer_state_and_keep_their_values(tmp_path, freeze):
    cfg = _cfg(tmp_path, freeze)
    model, run, ctx = _prepare(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, targets = _batches(1)[0]
    torch.nn.functional.cross_entropy(model(images), targets).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _epoch(cfg, ctx, 0)  # the real steps (the engine sets the gradients to None after each)
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g['params']}
    for name, p in model.named_parameters():
        frozen = name.startswith(FROZEN_PREFIXES[freeze])
        assert p.requires_grad != frozen and (name in grads) != frozen, name
        assert (id(p) in in_optimizer) != frozen and (p in run.optimizer.state) != frozen, name
        assert torch.equal(p, before[name]) == frozen, name
    if freeze == 'head_only':
        trained = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
        assert trained == {'head.weight', 'head.bias'}
    trains = 'head' if freeze == 'head_only' else 'layers.1, norm, head'
    assert describe_frozen(model).endswith(f'training {trains}')
    # train_one_epoch put the model in train mode: the frozen stages stayed in eval mode (no drop path)
    assert not model.layers[0].training and model.layers[1].training == (freeze == 'stages')


def test_ddp_trains_a_frozen_model_without_find_unused_parameters(tmp_path):
    """Frozen parameters do not require gradients, so DDP's reducer waits for none of them: a second step would
    fail ('Expected to have finished reduction') if it did."""
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        cfg = _cfg(tmp_path, 'stages')
        model, run, ctx = _prepare(cfg)
        # the run's own wrapping (a DistEnv of two processes makes wrap_model wrap; the group has the one)
        ctx.model = wrap_model(DistEnv(rank=0, local_rank=0, world_size=2, device=CPU.device), model)
        assert isinstance(ctx.model, torch.nn.parallel.DistributedDataParallel)
        frozen = model.layers[0].blocks[0].attn.qkv.weight.detach().clone()
        _epoch(cfg, ctx, 0)
        _epoch(cfg, ctx, 1)
        assert torch.equal(model.layers[0].blocks[0].attn.qkv.weight, frozen)
    finally:
        torch.distributed.destroy_process_group()


def test_a_resumed_frozen_run_continues_exactly_and_checkpoints_keep_the_frozen_weights(tmp_path):
    cfg = _cfg(tmp_path / 'straight', 'stages')
    straight, _, ctx = _prepare(cfg)
    for epoch in (0, 1):
        _epoch(cfg, ctx, epoch)

    cfg = _cfg(tmp_path / 'stopped', 'stages')
    first, run, ctx = _prepare(cfg)
    _epoch(cfg, ctx, 0)
    state = TrainingState(first, run.optimizer, run.lr_scheduler, run.scaler)
    path = build_checkpointer(cfg, state, 0, LOG).save(0, 0.0)
    assert 'patch_embed.proj.weight' in torch.load(path, weights_only=True)['model']

    resumed, run, ctx = _prepare(cfg, seed=1)  # other initial weights: the frozen ones too must come from the file
    checkpointer = build_checkpointer(cfg, TrainingState(resumed, run.optimizer, run.lr_scheduler, run.scaler), 0, LOG)
    assert checkpointer.resume(path).epoch == 1
    _epoch(cfg, ctx, 1)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_frozen_stages_beyond_the_model_are_one_error_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r'TRAIN.FROZEN_STAGES 3 must be in \[-1, 2\]'):
        build_model(_cfg(tmp_path, 'none', FROZEN_STAGES=3))
    with pytest.raises(UserError, match='TRAIN.HEAD_ONLY'):
        build_model(_cfg(tmp_path, 'head_only'), is_pretrain=True)
