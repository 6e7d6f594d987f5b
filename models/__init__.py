"""The Swin model family: Swin Transformer V1 and V2, Swin-MLP and Swin-MoE, their builder and a variant registry.

``build_model(config)`` builds from a config; ``create_model(name, **kwargs)`` builds a registered
variant by name (``list_models()`` lists them); the classes take plain constructor arguments. Every family is a
:class:`SwinBase` of its own block and merge. ``DERIVED_BUFFERS`` names the buffers a model recomputes and never
saves (``is_derived_buffer(key)`` tests a state-dict key): what a loader drops from official checkpoints.
"""
from .build import build_model
from .complexity import count_flops, count_params
from .registry import create_model, is_model, list_models, register_model
from .swin_base import SwinBase
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_transformer_moe import SwinTransformerMoE
from .swin_transformer_v2 import SwinTransformerV2
from .windows import DERIVED_BUFFERS, is_derived_buffer

__all__ = ['build_model', 'create_model', 'list_models', 'is_model', 'register_model', 'count_flops',
           'count_params', 'SwinBase', 'SwinTransformer', 'SwinTransformerV2', 'SwinMLP', 'SwinTransformerMoE',
           'DERIVED_BUFFERS', 'is_derived_buffer']
