"""FSDP's mixed-precision policy per module: under a bf16 policy the relative-position bias (V1's table, V2's
``cpb_mlp``) and its gradient are gathered and reduced in fp32, the rest of the block in bf16 (one gloo process
in this process: enough for FSDP2 to shard, gather and reduce)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from config import get_default_config
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from conftest import needs_cpu_fsdp
from utils import sharding
from utils.errors import UserError
from utils.sharding import shard_model

TINY = dict(img_size=32, patch_size=4, num_classes=3, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _record_dtypes(module: torch.nn.Module, name: str, seen: dict) -> None:
    """On each forward of ``module``, the dtype of its gathered parameter ``name`` and of that parameter's
    gradient (before FSDP reduces it)."""
    def hook(mod, args):
        param = getattr(mod, name)
        seen['weight'] = param.dtype
        if param.requires_grad:
            param.register_hook(lambda grad: seen.__setitem__('grad', grad.dtype))
    module.register_forward_pre_hook(hook)


@needs_cpu_fsdp
@pytest.mark.parametrize('family', ['v1', 'v2'])
def test_the_position_bias_stays_fp32_under_a_bf16_policy(one_rank_group, family):
    model = SwinTransformer(**TINY) if family == 'v1' else SwinTransformerV2(**TINY, pretrained_window_sizes=[0, 0])
    attn = model.layers[0].blocks[0].attn
    bias_owner, bias_name = (attn, 'relative_position_bias_table') if family == 'v1' else (attn.cpb_mlp[0], 'weight')
    bias, qkv = {}, {}
    _record_dtypes(bias_owner, bias_name, bias)
    _record_dtypes(attn.qkv, 'weight', qkv)
    shard_model(model, get_default_config(), torch.device('cpu'), torch.bfloat16)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    assert bias == {'weight': torch.float32, 'grad': torch.float32}
    if family == 'v1':  # V2 reads qkv's weight inside the attention: only the module hook of V1 sees it
        assert qkv == {'weight': torch.bfloat16, 'grad': torch.bfloat16}
    sharded_bias = getattr(bias_owner, bias_name)
    assert sharded_bias.dtype == torch.float32 and sharded_bias.grad is not None
    assert torch.isfinite(sharded_bias.grad.full_tensor()).all()


def test_fsdp_on_a_cpu_whose_torch_cannot_run_it_is_one_clear_error(one_rank_group, monkeypatch):
    """torch 2.6's CPU streams lack what FSDP2 calls: a UserError before any sharding, not a crash mid-step."""
    monkeypatch.setattr(sharding, 'fsdp_runs_on_cpu', lambda: False)
    with pytest.raises(UserError, match='fsdp on the CPU needs torch 2.7 or newer'):
        shard_model(SwinTransformer(**TINY), get_default_config(), torch.device('cpu'), torch.bfloat16)


@needs_cpu_fsdp
def test_v1_attention_units_raise_no_view_tensor_warning_and_other_modules_keep_it(one_rank_group):
    """V1's attention and its qkv / proj are FSDP units of their own, and a Linear of 3-D tokens returns a view:
    FSDP2 (torch 2.11+) warns on every run although Swin's forward makes no in-place op on those outputs."""
    import warnings
    model = SwinTransformer(**TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        shard_model(model, get_default_config(), torch.device('cpu'), torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        warnings.warn('FSDP2-wrapped module (FSDPUserModule) returned a view tensor. An in-place op ...', UserWarning)
    views = [str(w.message).split(')')[0] for w in caught if 'returned a view tensor' in str(w.message)]
    assert views == ['FSDP2-wrapped module (FSDPUserModule']
