"""Swin weights in the layouts people download, converted to and from the official layout.

Our models, checkpoints and loaders use the official microsoft/Swin-Transformer key names. Weights also come as:

* **timm** (``swin_*``, ``swinv2_*``): official names, except that each stage's patch merging sits at the start of
  the next stage (``layers.{i}.downsample`` for the official ``layers.{i-1}.downsample``) and the classifier is
  ``head.fc``;
* **Hugging Face transformers** (``Swin*`` / ``Swinv2*``): ``swin.`` / ``swinv2.`` prefix, ``embeddings.*``,
  ``layernorm_before/after``, three linears ``attention.self.{query,key,value}`` for the official ``qkv`` (V2:
  their biases are ``q_bias`` and ``v_bias``; key has none), ``intermediate.dense`` / ``output.dense``,
  ``classifier``; transformers 5 holds V1 in memory as ``attention.{q,k,v,o}_proj`` / ``mlp.fc1`` (**hf5**);
* **mmdet / mmseg** backbones: ``backbone.stages.N.blocks.M.attn.w_msa.*``, ``ffn.layers.0.0`` / ``ffn.layers.1``,
  ``patch_embed.projection``, and a patch merging built on ``nn.Unfold`` whose input channels are ordered
  differently (channel-major, 2x2 positions row-major);
* the official **detection / segmentation** repositories: official names under ``backbone.``, out norms ``norm{i}``;
* **SimMIM** pre-training: official names under ``encoder.``, plus ``decoder.*`` and a mask token.

The layout is recognised from the keys alone (:func:`detect_layout`), never from a file name. :func:`to_official`
converts; :func:`from_official` writes timm, transformers, mmdet or detection names back. Derived buffers
(``relative_position_index``, ``attn_mask``, ``relative_coords_table``) are dropped: every model rebuilds them.

:func:`read_snapshot` reads a file or a hub snapshot folder (``config.json`` + weights, offline) into weights,
model arguments, class names and preprocessing; :func:`write_timm_folder` / :func:`write_hf_folder` write folders
that timm and transformers load as they are. :data:`OFFICIAL_ZOO` holds the accuracies the official model zoo
reports for its released checkpoints (:func:`zoo_entry` recognises them).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from utils.errors import UserError

__all__ = ['Layout', 'Snapshot', 'ZooEntry', 'OFFICIAL_ZOO', 'LAYOUTS', 'detect_layout', 'to_official',
           'from_official', 'infer_model_args', 'fit_problems', 'check_fits', 'read_snapshot', 'hf_config',
           'timm_config', 'write_timm_folder', 'write_hf_folder', 'model_opts', 'zoo_entry', 'zoo_line',
           'is_snapshot_folder']

LAYOUTS = ('official', 'timm', 'hf', 'hf5', 'mmdet', 'detection', 'simmim')
_LAYOUT_LABELS = {
    'official': 'official', 'timm': 'timm', 'hf': 'Hugging Face transformers',
    'hf5': 'Hugging Face transformers 5 (in-memory names)', 'mmdet': 'mmdetection/mmsegmentation',
    'detection': 'official detection/segmentation', 'simmim': 'SimMIM pre-training', 'unknown': 'unknown'}
# Families are MODEL.TYPE values.
_FAMILY_LABELS = {'swin': 'Swin V1', 'swinv2': 'Swin V2', 'swin_mlp': 'Swin-MLP', 'swin_moe': 'Swin-MoE', '': '?'}
# Buffers each model rebuilds from its window and input size; files may or may not hold them.
DERIVED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')
_WRAPPERS = ('module.', '_orig_mod.')
_BLOCK = re.compile(r'(?:^|\.)(layers\.\d+\.blocks\.\d+\.)')


@dataclass(frozen=True)
class Layout:
    """A recognised key layout: ``name`` (one of :data:`LAYOUTS`, or 'unknown'), ``family`` (a MODEL.TYPE:
    'swin', 'swinv2', 'swin_mlp', 'swin_moe'), the ``prefix`` the Swin keys sit under, the groups of keys that
    are not part of a Swin classifier and were left out (``dropped``, e.g. ``'neck.* (12 tensors)'``), and for
    an unknown layout the closest ``guess``."""
    name: str
    family: str = ''
    prefix: str = ''
    dropped: Tuple[str, ...] = ()
    guess: str = ''

    def describe(self) -> str:
        """One line for the log, e.g. ``timm layout (Swin V2)``."""
        if self.name == 'unknown':
            return f"unrecognised layout (closest: {self.guess or 'none'})"
        text = f"{_LAYOUT_LABELS[self.name]} layout ({_FAMILY_LABELS[self.family]})"
        if self.prefix:
            text += f", prefix '{self.prefix}'"
        if self.dropped:
            text += f", left out: {', '.join(self.dropped[:4])}" + (' ...' if len(self.dropped) > 4 else '')
        return text


# ------------------------------------------------------------------------------------------------ recognising

def _strip_wrappers(state: Mapping[str, Any]) -> Dict[str, Any]:
    """DDP / torch.compile wrappers prefix every key; they say nothing about the layout."""
    state = dict(state)
    for prefix in _WRAPPERS:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_buffer(key: str) -> bool:
    return key.rsplit('.', 1)[-1] in DERIVED_BUFFERS


def _family(keys: Iterable[str]) -> str:
    """The model family from official- or HF-named keys (MoE blocks carry V2's cpb_mlp too: test MoE first)."""
    keys = list(keys)
    if any('_moe_layer' in k for k in keys):
        return 'swin_moe'
    if any('logit_scale' in k or 'cpb_mlp' in k or 'continuous_position_bias_mlp' in k for k in keys):
        return 'swinv2'
    if any('spatial_mlp' in k for k in keys):
        return 'swin_mlp'
    return 'swin'


def _prefix_before(keys: Sequence[str], markers: Sequence[str]) -> Optional[str]:
    """The text before the first of ``markers`` in the first key holding one (the Swin keys' prefix)."""
    for k in keys:
        for m in markers:
            i = k.find(m)
            if i == 0 or (i > 0 and k[i - 1] == '.'):
                return k[:i]
    return None


def _left_out(keys: Iterable[str], prefix: str, kept: Sequence[str] = ()) -> Tuple[str, ...]:
    """Groups (first name component) of the keys outside ``prefix`` and not in ``kept``, with their counts."""
    groups: Dict[str, List[str]] = {}
    for k in keys:
        if not k.startswith(prefix) and not k.startswith(tuple(kept)):
            groups.setdefault(k.split('.', 1)[0], []).append(k)
    return tuple(f"{g}.* ({len(ks)} tensors)" if len(ks) > 1 else ks[0] for g, ks in groups.items())


_VOCABULARY = {  # words typical of each layout, to name the closest one when nothing is recognised
    'official': ('patch_embed.proj', 'attn.qkv', 'relative_position_bias_table', 'mlp.fc1', 'downsample.reduction'),
    'hf': ('embeddings.', 'layernorm_', 'attention.', 'intermediate.dense'),
    'mmdet': ('w_msa', 'ffn.layers', 'stages.', 'patch_embed.projection'),
    'timm swinv2_cr (not supported: another architecture than the official Swin V2)': ('meta_mlp',),
}


def _closest(keys: Sequence[str]) -> str:
    if any('meta_mlp' in k for k in keys):  # timm's swinv2_cr_*: say so, whatever else matches
        return next(name for name in _VOCABULARY if name.startswith('timm swinv2_cr'))
    scores = {name: sum(any(w in k for w in words) for k in keys) for name, words in _VOCABULARY.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] else ''


def _official_prefix(keys: Sequence[str]) -> Optional[str]:
    """The prefix of official-style block keys (``[prefix]layers.N.blocks.M.*``), None when there are none."""
    for k in keys:
        m = _BLOCK.search(k)
        if m:
            return k[:m.start(1)]
    return None


def _official_structure(body: Sequence[str]) -> str:
    """'timm' when patch merging sits at the start of stages (none in stage 0), else 'official'."""
    if any(k.startswith('layers.0.downsample.') for k in body):
        return 'official'
    if any(re.match(r'layers\.\d+\.downsample\.', k) for k in body) or any(k.startswith('head.fc.') for k in body):
        return 'timm'
    return 'official'  # one stage, or no merging kept: both layouts name it the same


def detect_layout(state: Mapping[str, Any]) -> Layout:
    """Recognise the layout of a state dict from its keys (wrapper prefixes 'module.', '_orig_mod.' ignored)."""
    keys = list(_strip_wrappers(state))
    hf = _prefix_before(keys, ('embeddings.patch_embeddings.', 'encoder.layers.'))
    if hf is not None and any('layernorm_before.' in k or 'embeddings.patch_embeddings.' in k for k in keys):
        name = 'hf5' if any('.attention.q_proj.' in k or '.attention.o_proj.' in k for k in keys) else 'hf'
        return Layout(name, _family(keys), hf, _left_out(keys, hf, ('classifier.', 'hidden_states_norms.')))
    mm = _prefix_before(keys, ('stages.', 'patch_embed.projection.'))
    if mm is not None and any('attn.w_msa.' in k or 'ffn.layers.' in k for k in keys):
        return Layout('mmdet', 'swin', mm, _left_out(keys, mm))
    prefix = _official_prefix(keys)
    if prefix is None:
        return Layout('unknown', guess=_closest(keys))
    body = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    name = _official_structure(body)
    if name == 'official' and prefix == 'backbone.':
        name = 'detection'
    elif name == 'official' and prefix == 'encoder.':
        name = 'simmim'
    return Layout(name, _family(body), prefix, _left_out(keys, prefix))


def _unknown_error(state: Mapping[str, Any], layout: Layout, source: str) -> UserError:
    first = ', '.join(list(state)[:3]) or 'no keys'
    return UserError(f"{source}: not a Swin layout this framework reads ({layout.describe()}; first keys: {first}); "
                     f"it reads {', '.join(_LAYOUT_LABELS[n] for n in LAYOUTS if n != 'hf5')}")


# ------------------------------------------------------------------------------------- reading: to official

# Inside a block, Hugging Face name -> official name; both the names written to files and transformers 5's
# in-memory names of V1 (relative_position_bias.*, o_proj, mlp.fc1/fc2). First match wins: 'attention.output.'
# comes before 'output.' (the MLP's second linear).
_HF_IN_BLOCK = (
    ('layernorm_before.', 'norm1.'), ('layernorm_after.', 'norm2.'),
    ('attention.self.relative_position_bias_table', 'attn.relative_position_bias_table'),
    ('attention.relative_position_bias.relative_position_bias_table', 'attn.relative_position_bias_table'),
    ('attention.self.logit_scale', 'attn.logit_scale'),
    ('attention.self.continuous_position_bias_mlp.', 'attn.cpb_mlp.'),
    ('attention.output.dense.', 'attn.proj.'), ('attention.o_proj.', 'attn.proj.'),
    ('intermediate.dense.', 'mlp.fc1.'), ('output.dense.', 'mlp.fc2.'),
    ('mlp.fc1.', 'mlp.fc1.'), ('mlp.fc2.', 'mlp.fc2.'))
# The three attention input linears, merged into the official qkv.
_HF_QKV = (('attention.self.query.', 'q'), ('attention.self.key.', 'k'), ('attention.self.value.', 'v'),
           ('attention.q_proj.', 'q'), ('attention.k_proj.', 'k'), ('attention.v_proj.', 'v'))
_HF_OUTER = (('embeddings.patch_embeddings.projection.', 'patch_embed.proj.'),
             ('embeddings.norm.', 'patch_embed.norm.'), ('embeddings.position_embeddings', 'absolute_pos_embed'),
             ('layernorm.', 'norm.'))
_HF_BLOCK_KEY = re.compile(r'encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)')
_HF_MERGE_KEY = re.compile(r'encoder\.layers\.(\d+)\.downsample\.(.+)')


def _hf_name(key: str) -> Optional[str]:
    """The official name of a Hugging Face key (its prefix removed), None when it has none."""
    m = _HF_BLOCK_KEY.fullmatch(key)
    if m:
        block, rest = f'layers.{m.group(1)}.blocks.{m.group(2)}.', m.group(3)
        return next((block + ours + rest[len(hf):] for hf, ours in _HF_IN_BLOCK if rest.startswith(hf)), None)
    m = _HF_MERGE_KEY.fullmatch(key)
    if m:
        return f'layers.{m.group(1)}.downsample.{m.group(2)}'
    return next((ours + key[len(hf):] for hf, ours in _HF_OUTER if key.startswith(hf)), None)


def _qkv_part(key: str) -> Optional[Tuple[Tuple[str, str], str, str]]:
    """(stage, block), 'q'|'k'|'v', 'weight'|'bias' for one of the three attention linears, else None."""
    m = _HF_BLOCK_KEY.fullmatch(key)
    if not m:
        return None
    for hf, part in _HF_QKV:
        if m.group(3).startswith(hf):
            return (m.group(1), m.group(2)), part, m.group(3)[len(hf):]
    return None


def _merge_qkv(parts: Dict[tuple, Dict[str, Dict[str, torch.Tensor]]], family: str, source: str) -> Dict[str, Any]:
    """Three linears -> the official qkv linear (rows q, k, v: the order the official attention splits them).
    V2 keeps q and v biases apart (``q_bias``, ``v_bias``) and has no key bias."""
    out: Dict[str, Any] = {}
    for (stage, block), p in parts.items():
        base = f'layers.{stage}.blocks.{block}.attn.'
        if any('weight' not in p.get(c, {}) for c in 'qkv'):
            raise UserError(f"{source}: {base}: query, key and value weights are not all present")
        out[base + 'qkv.weight'] = torch.cat([p[c]['weight'] for c in 'qkv'])
        if family == 'swinv2':
            for c in ('q', 'v'):
                if 'bias' in p[c]:
                    out[f'{base}{c}_bias'] = p[c]['bias']
        elif 'bias' in p['q']:
            out[base + 'qkv.bias'] = torch.cat([p[c]['bias'] for c in 'qkv'])
    return out


def _hf_to_official(state: Dict[str, Any], layout: Layout, source: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    parts: Dict[tuple, Dict[str, Dict[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in state.items():
        if _is_buffer(key) or key.endswith('embeddings.mask_token'):
            continue  # rebuilt by the model / only used by masked-image-modelling pre-training
        norm = re.fullmatch(r'hidden_states_norms\.stage(\d+)\.(.+)', key)
        if key.startswith('classifier.'):
            out['head.' + key[len('classifier.'):]] = value
        elif norm:  # SwinBackbone's per-output norms: stage1 is the first stage's output
            out[f'norm{int(norm.group(1)) - 1}.{norm.group(2)}'] = value
        elif key.startswith(layout.prefix):
            body = key[len(layout.prefix):]
            if body.startswith(('swin.', 'swinv2.')):  # transformers 5 writes SwinBackbone's final norm prefixed only
                body = body.split('.', 1)[1]
            qkv, name = _qkv_part(body), _hf_name(body)
            if qkv:
                parts.setdefault(qkv[0], {}).setdefault(qkv[1], {})[qkv[2]] = value
            elif name:
                out[name] = value
            else:
                unknown.append(key)
    if unknown:
        raise UserError(f"{source}: {layout.describe()}: keys without an official counterpart: {_first(unknown)}")
    out.update(_merge_qkv(parts, layout.family, source))
    return out


def _unfold_to_official(value: torch.Tensor) -> torch.Tensor:
    """mm* patch merging (nn.Unfold: input channel c*4 + p, p over the 2x2 window row-major) -> official (q*C + c,
    q over x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]). The two orders swap positions 1 and 2."""
    lead, n = value.shape[:-1], value.shape[-1]
    v = value.reshape(*lead, n // 4, 4).transpose(-1, -2)
    return v[..., [0, 2, 1, 3], :].reshape(*lead, n).contiguous()


def _official_to_unfold(value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_unfold_to_official`."""
    lead, n = value.shape[:-1], value.shape[-1]
    v = value.reshape(*lead, 4, n // 4)[..., [0, 2, 1, 3], :]
    return v.transpose(-1, -2).reshape(*lead, n).contiguous()


_MM_IN_BLOCK = (('attn.w_msa.', 'attn.'), ('ffn.layers.0.0.', 'mlp.fc1.'), ('ffn.layers.1.', 'mlp.fc2.'),
                ('norm1.', 'norm1.'), ('norm2.', 'norm2.'))


def _mm_name(key: str) -> Optional[str]:
    """The official name of an mmdet/mmseg backbone key (prefix removed), None when it has none."""
    m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', key)
    if m:
        block, rest = f'layers.{m.group(1)}.blocks.{m.group(2)}.', m.group(3)
        return next((block + ours + rest[len(mm):] for mm, ours in _MM_IN_BLOCK if rest.startswith(mm)), None)
    m = re.fullmatch(r'stages\.(\d+)\.downsample\.((?:reduction|norm)\..+)', key)
    if m:
        return f'layers.{m.group(1)}.downsample.{m.group(2)}'
    if key.startswith('patch_embed.projection.'):
        return 'patch_embed.proj.' + key[len('patch_embed.projection.'):]
    if key.startswith('patch_embed.norm.') or key == 'absolute_pos_embed' or re.match(r'norm\d*\.', key):
        return key
    return None


def _mm_to_official(state: Dict[str, Any], layout: Layout, source: str) -> Dict[str, Any]:
    out, unknown = {}, []
    for key, value in state.items():
        if not key.startswith(layout.prefix) or _is_buffer(key):
            continue
        name = _mm_name(key[len(layout.prefix):])
        if name is None:
            unknown.append(key)
            continue
        if '.downsample.' in name:
            value = _unfold_to_official(value)
        elif name == 'absolute_pos_embed' and value.dim() == 4:  # an older (1, C, H, W) form
            value = value.flatten(2).transpose(1, 2)
        out[name] = value
    if unknown:
        raise UserError(f"{source}: {layout.describe()}: keys without an official counterpart: {_first(unknown)}")
    return out


def _timm_to_official(body: Dict[str, Any]) -> Dict[str, Any]:
    """timm's merging at the start of stage i is the official merging at the end of stage i-1."""
    out = {}
    for key, value in body.items():
        m = re.match(r'layers\.(\d+)\.downsample\.', key)
        if m:
            key = f'layers.{int(m.group(1)) - 1}.downsample.' + key[m.end():]
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def _convert(state: Mapping[str, Any], source: str) -> Tuple[Dict[str, Any], Layout]:
    """:func:`to_official`, keeping official-named derived buffers (they tell window and image sizes)."""
    state = _strip_wrappers(state)
    layout = detect_layout(state)
    if layout.name == 'unknown':
        raise _unknown_error(state, layout, source)
    if layout.name in ('hf', 'hf5'):
        return _hf_to_official(state, layout, source), layout
    if layout.name == 'mmdet':
        return _mm_to_official(state, layout, source), layout
    body = {k[len(layout.prefix):]: v for k, v in state.items() if k.startswith(layout.prefix)}
    if layout.name == 'simmim':
        body.pop('mask_token', None)  # only the pre-training model uses it
    return (_timm_to_official(body) if layout.name == 'timm' else body), layout


def to_official(state: Mapping[str, Any], source: str = 'weights') -> Tuple[Dict[str, Any], Layout]:
    """Convert a state dict of any layout this module reads to the official layout; returns it with the
    :class:`Layout` recognised. Derived buffers are dropped; keys outside the Swin model (a detector's neck and
    heads, SimMIM's decoder) are left out and listed in ``Layout.dropped``. A layout it cannot recognise is a
    UserError naming the first keys and the closest layout (``source`` names the file in messages)."""
    out, layout = _convert(state, source)
    return {k: v for k, v in out.items() if not _is_buffer(k)}, layout


def _first(keys: Sequence[str], n: int = 3) -> str:
    keys = list(keys)
    return ', '.join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else '')


# ------------------------------------------------------------------------------------- writing: from official

# Official -> Hugging Face names inside a block: the names transformers writes to files (4.x and 5 read them).
_HF_OUT_BLOCK = (('norm1.', 'layernorm_before.'), ('norm2.', 'layernorm_after.'),
                 ('attn.relative_position_bias_table', 'attention.self.relative_position_bias_table'),
                 ('attn.logit_scale', 'attention.self.logit_scale'),
                 ('attn.cpb_mlp.', 'attention.self.continuous_position_bias_mlp.'),
                 ('attn.proj.', 'attention.output.dense.'), ('mlp.fc1.', 'intermediate.dense.'),
                 ('mlp.fc2.', 'output.dense.'))
_HF_QKV_OUT = ('query', 'key', 'value')


def _hf_block_out(block: str, rest: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One official block key -> Hugging Face keys (the qkv linear splits into three)."""
    attn = block + 'attention.self.'
    if rest in ('attn.qkv.weight', 'attn.qkv.bias'):
        leaf = rest.rsplit('.', 1)[1]
        return {f'{attn}{name}.{leaf}': part for name, part in zip(_HF_QKV_OUT, value.chunk(3))}
    if rest in ('attn.q_bias', 'attn.v_bias'):
        return {f"{attn}{'query' if rest == 'attn.q_bias' else 'value'}.bias": value}
    for ours, hf in _HF_OUT_BLOCK:
        if rest.startswith(ours):
            return {block + hf + rest[len(ours):]: value}
    return {}


def _hf_key_out(key: str, value: torch.Tensor, prefix: str) -> Dict[str, torch.Tensor]:
    m = re.fullmatch(r'layers\.(\d+)\.blocks\.(\d+)\.(.+)', key)
    if m:
        return _hf_block_out(f'{prefix}encoder.layers.{m.group(1)}.blocks.{m.group(2)}.', m.group(3), value)
    m = re.fullmatch(r'layers\.(\d+)\.downsample\.(.+)', key)
    if m:
        return {f'{prefix}encoder.layers.{m.group(1)}.downsample.{m.group(2)}': value}
    m = re.fullmatch(r'norm(\d+)\.(.+)', key)
    if m:
        return {f'hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}': value}
    if key.startswith('head.'):
        return {'classifier.' + key[len('head.'):]: value}
    for hf, ours in _HF_OUTER:
        if key.startswith(ours):
            return {prefix + hf + key[len(ours):]: value}
    return {}


def _official_to_hf(state: Mapping[str, Any], family: str) -> Dict[str, Any]:
    if family not in ('swin', 'swinv2'):
        raise UserError(f"transformers has no {_FAMILY_LABELS.get(family, family)} model; write official weights")
    prefix = 'swin.' if family == 'swin' else 'swinv2.'
    out, unknown = {}, []
    for key, value in state.items():
        converted = _hf_key_out(key, value, prefix)
        out.update(converted)
        if not converted:
            unknown.append(key)
    if unknown:
        raise UserError(f"no transformers name for: {_first(unknown)}")
    return out


def _official_to_timm(state: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in state.items():
        m = re.match(r'layers\.(\d+)\.downsample\.', key)
        if m:
            key = f'layers.{int(m.group(1)) + 1}.downsample.' + key[m.end():]
        elif key.startswith('head.'):
            key = 'head.fc.' + key[len('head.'):]
        out[key] = value
    return out


def _official_to_mm(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The backbone only, as mmdet/mmseg name it (their converter drops the classifier too)."""
    inverse = tuple((ours, mm) for mm, ours in _MM_IN_BLOCK)
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r'layers\.(\d+)\.(blocks\.\d+\.|downsample\.)(.+)', key)
        if key.startswith(('head.', 'norm.')):
            continue
        if m and m.group(2) == 'downsample.':
            key, value = f'stages.{m.group(1)}.downsample.{m.group(3)}', _official_to_unfold(value)
        elif m:
            rest = m.group(3)
            rest = next((mm + rest[len(ours):] for ours, mm in inverse if rest.startswith(ours)), rest)
            key = f'stages.{m.group(1)}.{m.group(2)}{rest}'
        elif key.startswith('patch_embed.proj.'):
            key = 'patch_embed.projection.' + key[len('patch_embed.proj.'):]
        out['backbone.' + key] = value
    return out


def from_official(state: Mapping[str, Any], layout: str, family: str = 'swin') -> Dict[str, Any]:
    """Official-layout weights in another ``layout``: 'timm', 'hf' (the names transformers writes to files),
    'mmdet' (the backbone, under ``backbone.``), 'detection' (the backbone under ``backbone.``, official names),
    'simmim' (``encoder.``) or 'official'. ``family`` (MODEL.TYPE) matters for 'hf': V1 and V2 differ.
    Derived buffers are left out; tensors are shared with ``state``, not copied."""
    state = {k: v for k, v in state.items() if not _is_buffer(k)}
    if layout == 'official':
        return state
    if layout == 'timm':
        return _official_to_timm(state)
    if layout == 'hf':
        return _official_to_hf(state, family)
    if layout == 'mmdet':
        return _official_to_mm(state)
    if layout == 'detection':
        return {'backbone.' + k: v for k, v in state.items() if not k.startswith(('head.', 'norm.'))}
    if layout == 'simmim':
        return {'encoder.' + k: v for k, v in state.items()}
    raise ValueError(f"cannot write the {layout!r} layout (choose from official, timm, hf, mmdet, detection, simmim)")


# ------------------------------------------------------------------------------------ model arguments from weights

def _depths(state: Mapping[str, Any]) -> List[int]:
    blocks: Dict[int, set] = {}
    for key in state:
        m = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return [len(blocks[i]) for i in sorted(blocks)] if blocks and sorted(blocks) == list(range(len(blocks))) else []


def _heads_and_window(state: Mapping[str, Any], family: str, stage: int) -> Tuple[Optional[int], Optional[int]]:
    """Heads of a stage and (from stage 0) the window size, where the weights or buffers tell them."""
    attn = f'layers.{stage}.blocks.0.attn.'
    if family == 'swin_mlp':
        w = state.get(f'layers.{stage}.blocks.0.spatial_mlp.weight')  # (heads * ws^2, ws^2, 1), grouped per head
        return (w.shape[0] // w.shape[1], math.isqrt(w.shape[1])) if w is not None else (None, None)
    if family == 'swin':
        table = state.get(attn + 'relative_position_bias_table')  # ((2 ws - 1)^2, heads)
        if table is None:
            return None, None
        return table.shape[1], (math.isqrt(table.shape[0]) + 1) // 2
    cpb = state.get(attn + 'cpb_mlp.2.weight')  # (heads, hidden): V2's table is continuous, the buffers tell ws
    coords, index = state.get(attn + 'relative_coords_table'), state.get(attn + 'relative_position_index')
    window = ((coords.shape[1] + 1) // 2 if coords is not None else
              math.isqrt(index.shape[0]) if index is not None else None)
    return (cpb.shape[0] if cpb is not None else None), window


def _img_size(state: Mapping[str, Any], patch: int, window: Optional[int]) -> Optional[int]:
    """Square input size from the absolute position embedding or stage 0's shifted-window mask, if present."""
    ape = state.get('absolute_pos_embed')
    if ape is not None:
        return math.isqrt(ape.shape[-2] if ape.dim() == 3 else ape.shape[-1] * ape.shape[-2]) * patch
    mask = state.get('layers.0.blocks.1.attn_mask')  # (windows, ws^2, ws^2)
    if mask is not None and window:
        return math.isqrt(mask.shape[0]) * window * patch
    return None


def infer_model_args(state: Mapping[str, Any], family: str) -> Dict[str, Any]:
    """Constructor arguments that official-layout weights determine (buffers included where present): embed_dim,
    in_chans, patch_size, depths, num_heads, mlp_ratio, qkv_bias, ape, patch_norm, num_classes, and window_size /
    img_size where a table or buffer tells them. Arguments the weights do not fix are left out."""
    args: Dict[str, Any] = {}
    proj = state.get('patch_embed.proj.weight')
    if proj is not None:
        args.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2])
    depths = _depths(state)
    if depths:
        args['depths'] = depths
        heads = [_heads_and_window(state, family, i)[0] for i in range(len(depths))]
        if all(heads):
            args['num_heads'] = heads
        window = _heads_and_window(state, family, 0)[1]
        if window:
            args['window_size'] = window
        fc1 = state.get('layers.0.blocks.0.mlp.fc1.weight')
        if fc1 is not None:
            args['mlp_ratio'] = fc1.shape[0] / fc1.shape[1]
    if family in ('swin', 'swin_moe'):
        args['qkv_bias'] = 'layers.0.blocks.0.attn.qkv.bias' in state
    elif family == 'swinv2':
        args['qkv_bias'] = 'layers.0.blocks.0.attn.q_bias' in state
    args['ape'] = 'absolute_pos_embed' in state
    args['patch_norm'] = 'patch_embed.norm.weight' in state
    head = state.get('head.weight')
    args['num_classes'] = head.shape[0] if head is not None else 0
    img = _img_size(state, args.get('patch_size', 4), args.get('window_size'))
    if img:
        args['img_size'] = img
    return args


# ------------------------------------------------------------------------------------------------ fitting a model

def fit_problems(state: Mapping[str, Any], model_state: Mapping[str, Any], ignore: Sequence[str] = ()) -> List[str]:
    """What keeps official-layout ``state`` from loading strictly into a model with ``model_state``: shapes first,
    then missing and unexpected keys (the first few of each). Derived buffers and keys starting with one of
    ``ignore`` (e.g. the parts a backbone leaves out) do not count."""
    def counts(key: str) -> bool:
        return not _is_buffer(key) and not key.startswith(tuple(ignore))
    shapes = [f"{k} weights {list(v.shape)} vs model {list(model_state[k].shape)}" for k, v in state.items()
              if k in model_state and counts(k) and tuple(v.shape) != tuple(model_state[k].shape)]
    missing = [k for k in model_state if k not in state and counts(k)]
    unexpected = [k for k in state if k not in model_state and counts(k)]
    return ([f"shape {_first(shapes, 2)}"] if shapes else []) + ([f"missing {_first(missing)}"] if missing else []) \
        + ([f"unexpected {_first(unexpected)}"] if unexpected else [])


def _mixup_hint(state: Mapping[str, Any], model_state: Mapping[str, Any], layout: Layout) -> str:
    """The likely cause of a misfit in words: another family, or a classifier of another size."""
    model_family = _family(model_state)
    if layout.family and model_family != layout.family:
        return (f" (the weights are {_FAMILY_LABELS[layout.family]}, the model is {_FAMILY_LABELS[model_family]}: "
                f"MODEL.TYPE {layout.family})")
    head, own = state.get('head.weight'), model_state.get('head.weight')
    if head is not None and own is not None and head.shape[0] != own.shape[0]:
        return (f" (a {head.shape[0]}-class head for a {own.shape[0]}-class model: give a class map "
                f"(MODEL.PRETRAINED_CLASS_MAP) or MODEL.NUM_CLASSES {head.shape[0]})")
    return ''


def check_fits(state: Mapping[str, Any], model_state: Mapping[str, Any], layout: Layout, source: str = 'weights',
               ignore: Sequence[str] = ()) -> None:
    """UserError in one line when converted weights do not fit the model: the layout recognised, the first
    mismatching keys, and the likely mix-up (V2 weights for a V1 model, a 22K head for a 1K model)."""
    problems = fit_problems(state, model_state, ignore)
    if problems:
        raise UserError(f"{source}: weights in the {layout.describe()} do not fit the model: "
                        f"{'; '.join(problems)}{_mixup_hint(state, model_state, layout)}")


# ---------------------------------------------------------------------------------------------- model configs

_SIZES = {'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)), 'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
          'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)), 'large': (192, (2, 2, 18, 2), (6, 12, 24, 48))}
_TIMM_V1 = re.compile(r'swin_(tiny|small|base|large)_patch(\d+)_window(\d+)_(\d+)')
# swinv2_base_window12to16_192to256: trained at window 12 / 192 px, fine-tuned to window 16 / 256 px.
_TIMM_V2 = re.compile(r'swinv2_(tiny|small|base|large)_window(\d+)(?:to(\d+))?_(\d+)(?:to(\d+))?')
_TIMM_ARGS = ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio',
              'qkv_bias', 'pretrained_window_sizes')
_INTERPOLATIONS = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box', 5: 'hamming'}  # PIL codes
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_timm_name(name: str) -> Tuple[str, Dict[str, Any]]:
    """MODEL.TYPE and constructor arguments of a timm Swin architecture (``swin_tiny_patch4_window7_224``,
    ``swinv2_base_window12to16_192to256``; a ``.tag`` suffix is ignored)."""
    arch = name.split('.')[0]
    m = _TIMM_V1.fullmatch(arch)
    if m:
        embed, depths, heads = _SIZES[m.group(1)]
        return 'swin', dict(embed_dim=embed, depths=list(depths), num_heads=list(heads), patch_size=int(m.group(2)),
                            window_size=int(m.group(3)), img_size=int(m.group(4)))
    m = _TIMM_V2.fullmatch(arch)
    if m:
        embed, depths, heads = _SIZES[m.group(1)]
        trained_window, trained_img = int(m.group(2)), int(m.group(4))
        # The last stages of the pre-training run were smaller than its window, which shrank to fit (patch 4).
        pretrained = ([min(trained_window, trained_img // (4 * 2 ** i)) for i in range(len(depths))]
                      if m.group(3) else [0] * len(depths))
        return 'swinv2', dict(embed_dim=embed, depths=list(depths), num_heads=list(heads), patch_size=4,
                              window_size=int(m.group(3) or trained_window),
                              img_size=int(m.group(5) or trained_img), pretrained_window_sizes=pretrained)
    raise UserError(f"timm architecture {name!r} is not a Swin this framework builds "
                    "(swin_<size>_patch<P>_window<W>_<img>, swinv2_<size>_window<W>_<img>)")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _timm_args(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """MODEL.TYPE and constructor arguments from a timm ``config.json`` (architecture + model_args)."""
    model_type, args = parse_timm_name(config['architecture'])
    extra = config.get('model_args') or {}
    if extra.get('head_dim') is not None:
        raise UserError(f"timm model_args head_dim {extra['head_dim']}: our Swin derives the head width from dim/heads")
    args.update({k: _plain(extra[k]) for k in _TIMM_ARGS if k in extra})
    window = args['window_size']
    if isinstance(window, list):  # timm takes a window per stage (or an (h, w) pair); ours one square window
        flat = [w for item in window for w in (item if isinstance(item, (list, tuple)) else [item])]
        if len(set(flat)) != 1:
            raise UserError(f"timm model_args window_size {window}: our models take one square window")
        args['window_size'] = flat[0]
    if model_type == 'swinv2' and not any(args['pretrained_window_sizes']):
        args['pretrained_window_sizes'] = [0] * len(args['depths'])  # the name's 4 stages, model_args' depth
    img = args['img_size']
    if isinstance(img, list) and len(img) == 2 and img[0] == img[1]:
        args['img_size'] = img[0]  # timm records a square size as [s, s]
    if 'num_classes' in config:
        args['num_classes'] = int(config['num_classes'])
    return model_type, args


def _hf_args(config: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """MODEL.TYPE and constructor arguments from a transformers ``config.json`` (SwinConfig / Swinv2Config)."""
    model_type = config.get('model_type')
    if model_type not in ('swin', 'swinv2'):
        raise UserError(f"config.json model_type {model_type!r}: not a transformers Swin or Swinv2 model")
    if config.get('hidden_act', 'gelu') != 'gelu' or config.get('layer_norm_eps', 1e-5) != 1e-5:
        raise UserError(f"config.json: hidden_act {config.get('hidden_act')!r}, layer_norm_eps "
                        f"{config.get('layer_norm_eps')}: our models use gelu and 1e-5")
    depths = list(config.get('depths', [2, 2, 6, 2]))
    args = dict(img_size=_plain(config.get('image_size', 224)), patch_size=config.get('patch_size', 4),
                in_chans=config.get('num_channels', 3), embed_dim=config.get('embed_dim', 96), depths=depths,
                num_heads=list(config.get('num_heads', [3, 6, 12, 24])), window_size=config.get('window_size', 7),
                mlp_ratio=config.get('mlp_ratio', 4.0), qkv_bias=config.get('qkv_bias', True),
                ape=config.get('use_absolute_embeddings', False))
    if model_type == 'swinv2':  # transformers keeps 4 entries whatever the depth; ours one per stage
        pretrained = list(config.get('pretrained_window_sizes', [0] * len(depths)))
        args['pretrained_window_sizes'] = (pretrained + [0] * len(depths))[:len(depths)]
    return model_type, args


def _class_names(config: Mapping[str, Any]) -> Optional[List[str]]:
    """HF's id2label (unless only its LABEL_i placeholders) or timm's label_names, in class-index order."""
    names = config.get('label_names') or (config.get('pretrained_cfg') or {}).get('label_names')
    if names is None and config.get('id2label'):
        names = config['id2label']
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names, key=int)]
    if not names or names == [f'LABEL_{i}' for i in range(len(names))]:
        return None
    return [str(n) for n in names]


def _timm_preprocessing(config: Mapping[str, Any]) -> Dict[str, Any]:
    cfg = config.get('pretrained_cfg') or {}
    out = {k: _plain(cfg[k]) for k in ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
           if cfg.get(k) is not None}
    return out


def _hf_preprocessing(folder: str) -> Dict[str, Any]:
    """mean/std/interpolation/input size of a transformers ``preprocessor_config.json``, where there is one.
    Its ViT-style processor resizes the whole image to the input size (timm's crop_mode 'squash', crop_pct 1)."""
    path = os.path.join(folder, 'preprocessor_config.json')
    if not os.path.isfile(path):
        return {}
    cfg = _read_json(path)
    out: Dict[str, Any] = {}
    if cfg.get('image_mean') is not None:
        out['mean'], out['std'] = list(cfg['image_mean']), list(cfg.get('image_std') or IMAGENET_STD)
    if cfg.get('resample') in _INTERPOLATIONS:
        out['interpolation'] = _INTERPOLATIONS[cfg['resample']]
    size = cfg.get('size')
    if isinstance(size, int):
        size = {'height': size, 'width': size}
    if isinstance(size, dict) and 'height' in size and cfg.get('do_resize', True) and not cfg.get('do_center_crop'):
        out.update(input_size=[3, size['height'], size['width']], crop_pct=cfg.get('crop_pct') or 1.0,
                   crop_mode='squash')
    return out


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------- reading snapshots

@dataclass
class Snapshot:
    """Weights read from a file or a hub snapshot folder, ready to build and load a model:
    ``state`` in the official layout (derived buffers dropped), the ``layout`` recognised, ``model_type``
    (MODEL.TYPE) and ``model_args`` (constructor keyword arguments: from config.json where there is one, else what
    the weights fix), ``class_names`` (HF id2label / timm label_names, None where absent), ``preprocessing``
    (timm's names: input_size, interpolation, crop_pct, crop_mode, mean, std; only those given), ``source``
    (the weights file read) and ``multilabel`` (a classifier of independent classes, per config.json)."""
    state: Dict[str, torch.Tensor]
    layout: Layout
    model_type: str
    model_args: Dict[str, Any]
    class_names: Optional[List[str]] = None
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    source: str = ''
    config_kind: str = ''  # 'timm', 'hf', or '' without a config.json
    multilabel: bool = False  # config.json's problem_type says independent (sigmoid) classes

    def describe(self) -> str:
        """One log line: what was read and how it was understood."""
        converted = self.layout.name != 'official' or self.layout.prefix
        text = f"{self.source}: {self.layout.describe()}" + (', converted to the official layout' if converted else '')
        if self.config_kind:
            text += f"; model from its {'timm' if self.config_kind == 'timm' else 'transformers'} config.json"
        return text + (f"; {len(self.class_names)} class names" if self.class_names else '')


_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
                 'pytorch_model.bin.index.json')


def _weights_in(folder: str) -> str:
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"{folder}: no weights file ({', '.join(_WEIGHT_FILES[:2])}) in this folder")


def _state_of(ckpt: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """The state dict inside a checkpoint: 'model' (official, ours), 'state_dict' (mm*, lightning), or bare."""
    for key in ('model', 'state_dict', 'module'):
        if isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise UserError(f"{path}: no state dict inside (found keys: {_first(sorted(map(str, ckpt)), 6)})")


def _load_state(path: str) -> Dict[str, Any]:
    """Weights of one file, or of every shard a ``*.index.json`` lists; never runs code from a file."""
    from utils.fileio import load_file_safe  # the safe loader: weights_only pickles and safetensors
    if path.endswith('.index.json'):
        shards = sorted(set(_read_json(path).get('weight_map', {}).values()))
        state: Dict[str, Any] = {}
        for shard in shards:
            state.update(_load_state(os.path.join(os.path.dirname(path), shard)))
        return state
    return _state_of(load_file_safe(path), path)


def _config_next_to(path: str) -> Optional[Dict[str, Any]]:
    """A timm or transformers config.json beside a weights file (a file picked out of a snapshot folder). Any
    other config.json there is not the file's: a run's output folder holds its config as YAML under that name."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')
    if not os.path.isfile(candidate):
        return None
    try:
        config = _read_json(candidate)
    except UserError:
        return None
    return config if ('architecture' in config or 'model_type' in config) else None


def is_snapshot_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a hub snapshot folder: one holding a timm / transformers weights file
    (``model.safetensors``, ``pytorch_model.bin`` or their shard index). A run's output folder or a sharded
    ``.dcp`` checkpoint is not one."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES)


def _reconcile(model_type: str, args: Dict[str, Any], inferred: Dict[str, Any], layout: Layout,
               source: str) -> Dict[str, Any]:
    """config.json's arguments, completed by (and checked against) what the weights fix."""
    if model_type != layout.family:
        raise UserError(f"{source}: config.json describes {_FAMILY_LABELS[model_type]}, the weights are "
                        f"{_FAMILY_LABELS[layout.family]} ({layout.describe()})")
    checked = ('embed_dim', 'depths', 'num_heads', 'patch_size') + (('window_size',) if model_type == 'swin' else ())
    conflicts = [f"{k} {args[k]} vs {inferred[k]}" for k in checked
                 if k in args and k in inferred and _plain(args[k]) != _plain(inferred[k])]
    if conflicts:
        raise UserError(f"{source}: config.json and the weights disagree (config vs weights): {', '.join(conflicts)}")
    merged = {**inferred, **args}
    merged['num_classes'] = inferred['num_classes']  # the weights decide: a headless file builds a headless model
    return merged


def read_snapshot(path: str | os.PathLike, state: Optional[Mapping[str, Any]] = None) -> Snapshot:
    """Read a ``.pth``/``.bin``/``.safetensors`` file or a hub snapshot folder (``config.json`` + weights; read
    offline) of any layout :func:`detect_layout` recognises, into a :class:`Snapshot`. ``state``: the file's state
    dict where the caller has read it already (it is not read again). UserError (one line) for a missing file, an
    unrecognised layout, or a config.json that contradicts the weights."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, weights = path, _weights_in(path)
        config = _read_json(os.path.join(path, 'config.json')) if os.path.isfile(os.path.join(path, 'config.json')) \
            else None
    else:
        folder, weights, config = os.path.dirname(os.path.abspath(path)), path, _config_next_to(path)
    raw, layout = _convert(_load_state(weights) if state is None else state, weights)
    inferred = infer_model_args(raw, layout.family)
    kind = 'timm' if config and 'architecture' in config else 'hf' if config and 'model_type' in config else ''
    if kind:
        model_type, args = (_timm_args if kind == 'timm' else _hf_args)(config)
        args = _reconcile(model_type, args, inferred, layout, weights)
    else:
        model_type, args = layout.family, inferred
    names = _class_names(config) if config else None
    if names is not None and len(names) != args.get('num_classes'):
        names = None  # names of a head these weights do not hold (a backbone saved from a classifier's config)
    preprocessing = _timm_preprocessing(config) if kind == 'timm' else _hf_preprocessing(folder) if kind else {}
    state = {k: v for k, v in raw.items() if not _is_buffer(k)}
    multilabel = bool(config) and config.get('problem_type') == MULTI_LABEL
    return Snapshot(state, layout, model_type, args, names, preprocessing, weights, kind, multilabel)


# ---------------------------------------------------------------------------------------- writing folders

def _exportable(kind: str, model_type: str, args: Mapping[str, Any]) -> None:
    """What timm's and transformers' Swin cannot express, refused in one line rather than exported wrongly."""
    if model_type not in ('swin', 'swinv2'):
        raise UserError(f"{kind} has no {_FAMILY_LABELS.get(model_type, model_type)} model; write official weights")
    if not args.get('patch_norm', True):
        raise UserError(f"{kind}'s Swin always normalises patch embeddings and merges: PATCH_NORM False cannot export")
    if args.get('qk_scale') is not None:
        raise UserError(f"{kind}'s Swin scales attention by head_dim**-0.5: QK_SCALE {args['qk_scale']} cannot export")
    if kind == 'timm' and args.get('ape'):
        raise UserError("timm's Swin has no absolute position embedding: APE True cannot export to timm")


def _num_features(args: Mapping[str, Any]) -> int:
    return int(args['embed_dim'] * 2 ** (len(args['depths']) - 1))


def _hw(img: Any) -> Tuple[int, int]:
    return (int(img), int(img)) if isinstance(img, int) else (int(img[0]), int(img[1]))


def _names(class_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    if class_names is None:
        return None
    if len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names for a {num_classes}-class model")
    return [str(n) for n in class_names]


def timm_name(model_type: str, args: Mapping[str, Any]) -> str:
    """The timm architecture whose defaults are ``args`` (e.g. ``swin_tiny_patch4_window7_224``), else the
    family's first one (its config.json ``model_args`` then say what differs)."""
    import timm
    fallback = 'swin_tiny_patch4_window7_224' if model_type == 'swin' else 'swinv2_tiny_window8_256'
    compared = ('embed_dim', 'depths', 'num_heads', 'patch_size', 'window_size', 'img_size', 'pretrained_window_sizes')
    for name in timm.list_models('swin*'):
        try:
            kind, named = parse_timm_name(name)
        except UserError:
            continue
        if kind == model_type and all(_plain(named.get(k)) == _plain(args.get(k, named.get(k))) for k in compared):
            return name
    return fallback


# transformers' name for a classifier of independent (sigmoid) classes, written into both kinds of config.json
MULTI_LABEL = 'multi_label_classification'


def timm_config(model_type: str, model_args: Mapping[str, Any], class_names: Optional[Sequence[str]] = None,
                preprocessing: Optional[Mapping[str, Any]] = None, *, multilabel: bool = False) -> Dict[str, Any]:
    """A timm ``config.json`` (architecture, model_args, label_names, pretrained_cfg) for these arguments, class
    names and preprocessing (timm's names; defaults: the official evaluation's bicubic, crop 0.875, ImageNet
    mean/std); a ``multilabel`` model's also says ``problem_type`` (timm reads no such key and ignores it)."""
    _exportable('timm', model_type, model_args)
    n = int(model_args.get('num_classes', 1000))
    pre = {'interpolation': 'bicubic', 'crop_pct': 0.875, 'crop_mode': 'center', 'mean': IMAGENET_MEAN,
           'std': IMAGENET_STD, **(preprocessing or {})}
    h, w = _hw(model_args.get('img_size', 224))
    pretrained_cfg = dict(tag='', custom_load=False, input_size=[int(model_args.get('in_chans', 3)), h, w],
                          fixed_input_size=True, interpolation=pre['interpolation'], crop_pct=pre['crop_pct'],
                          crop_mode=pre['crop_mode'], mean=list(pre['mean']), std=list(pre['std']), num_classes=n,
                          pool_size=None, first_conv='patch_embed.proj', classifier='head.fc')
    config: Dict[str, Any] = dict(architecture=timm_name(model_type, model_args), num_classes=n,
                                  num_features=_num_features(model_args), global_pool='avg')
    names = _names(class_names, n)
    if names:
        config['label_names'] = names
    config['model_args'] = {k: _plain(model_args[k]) for k in _TIMM_ARGS
                            if k in model_args and (model_type == 'swinv2' or k != 'pretrained_window_sizes')}
    config['pretrained_cfg'] = pretrained_cfg
    if multilabel:
        config['problem_type'] = MULTI_LABEL
    return config


def hf_config(model_type: str, model_args: Mapping[str, Any], class_names: Optional[Sequence[str]] = None, *,
              multilabel: bool = False) -> Dict[str, Any]:
    """A transformers ``config.json`` (SwinConfig / Swinv2Config) for these arguments and class names
    (``LABEL_i`` where none are given); architectures: ``Swin[v2]ForImageClassification``, or ``Swin[v2]Model``
    for a headless model; ``problem_type`` multi_label_classification for a ``multilabel`` one."""
    _exportable('transformers', model_type, model_args)
    depths = [int(d) for d in model_args['depths']]
    n = int(model_args.get('num_classes', 1000))
    prefix = 'Swin' if model_type == 'swin' else 'Swinv2'
    img = model_args.get('img_size', 224)
    config: Dict[str, Any] = dict(
        architectures=[f'{prefix}ForImageClassification' if n else f'{prefix}Model'], model_type=model_type,
        image_size=_plain(img), patch_size=int(model_args.get('patch_size', 4)),
        num_channels=int(model_args.get('in_chans', 3)), embed_dim=int(model_args['embed_dim']), depths=depths,
        num_heads=[int(h) for h in model_args['num_heads']], num_layers=len(depths),
        window_size=int(model_args.get('window_size', 7)), mlp_ratio=float(model_args.get('mlp_ratio', 4.0)),
        qkv_bias=bool(model_args.get('qkv_bias', True)), hidden_act='gelu', hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.1, use_absolute_embeddings=bool(model_args.get('ape')),
        initializer_range=0.02, layer_norm_eps=1e-5, encoder_stride=32, hidden_size=_num_features(model_args))
    if model_type == 'swinv2':
        config['pretrained_window_sizes'] = [int(w) for w in model_args.get('pretrained_window_sizes') or
                                             [0] * len(depths)]
    if n:
        names = _names(class_names, n) or [f'LABEL_{i}' for i in range(n)]
        config['id2label'] = {str(i): name for i, name in enumerate(names)}
        config['label2id'] = {name: i for i, name in enumerate(names)}
    if multilabel:
        config['problem_type'] = MULTI_LABEL
    return config


def _hf_preprocessor_config(model_args: Mapping[str, Any], preprocessing: Optional[Mapping[str, Any]]) -> dict:
    """A ViT-style image processor: resize to the input size, rescale, normalise (crop_pct is not expressible)."""
    pre = {'interpolation': 'bicubic', 'mean': IMAGENET_MEAN, 'std': IMAGENET_STD, **(preprocessing or {})}
    h, w = _hw(model_args.get('img_size', 224))
    resample = next((code for code, name in _INTERPOLATIONS.items() if name == pre['interpolation']), 3)
    return dict(image_processor_type='ViTImageProcessor', do_resize=True, size={'height': h, 'width': w},
                resample=resample, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(pre['mean']), image_std=list(pre['std']))


def _save_safetensors(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Separate contiguous CPU copies (safetensors refuses views sharing storage, e.g. qkv's three chunks);
    ``format: pt`` is the metadata transformers expects. Written beside ``path``, then renamed over it."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in state.items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata={'format': 'pt'})
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: could not write: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(data: Mapping[str, Any], path: str) -> None:
    try:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(data, f, indent=2)
            f.write('\n')
    except OSError as e:
        raise UserError(f"{path}: could not write: {e.strerror or e}") from None


def write_timm_folder(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], model_type: str,
                      model_args: Mapping[str, Any], class_names: Optional[Sequence[str]] = None,
                      preprocessing: Optional[Mapping[str, Any]] = None, *, multilabel: bool = False) -> List[str]:
    """Write official-layout ``state`` as a timm folder (``model.safetensors`` in timm's layout + ``config.json``)
    that ``timm.create_model('local-dir:<folder>', pretrained=True)`` and
    ``timm.create_model(<architecture>, pretrained=True, pretrained_cfg_overlay=dict(file=<folder>/model.safetensors))``
    load as they are. Returns the paths written."""
    folder = os.fspath(folder)
    config = timm_config(model_type, model_args, class_names, preprocessing, multilabel=multilabel)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, 'model.safetensors'), os.path.join(folder, 'config.json')]
    _save_safetensors(from_official(state, 'timm'), paths[0])
    _write_json(config, paths[1])
    return paths


def write_hf_folder(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], model_type: str,
                    model_args: Mapping[str, Any], class_names: Optional[Sequence[str]] = None,
                    preprocessing: Optional[Mapping[str, Any]] = None, *, multilabel: bool = False) -> List[str]:
    """Write official-layout ``state`` as a transformers folder (``model.safetensors``, ``config.json``,
    ``preprocessor_config.json``) that ``AutoModelForImageClassification.from_pretrained(folder)`` loads as it is.
    Returns the paths written."""
    folder = os.fspath(folder)
    config = hf_config(model_type, model_args, class_names, multilabel=multilabel)
    weights = from_official(state, 'hf', model_type)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in ('model.safetensors', 'config.json', 'preprocessor_config.json')]
    _save_safetensors(weights, paths[0])
    _write_json(config, paths[1])
    _write_json(_hf_preprocessor_config(model_args, preprocessing), paths[2])
    return paths


_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}
_OPT_KEYS = (('patch_size', 'PATCH_SIZE'), ('in_chans', 'IN_CHANS'), ('embed_dim', 'EMBED_DIM'), ('depths', 'DEPTHS'),
             ('num_heads', 'NUM_HEADS'), ('window_size', 'WINDOW_SIZE'), ('mlp_ratio', 'MLP_RATIO'),
             ('qkv_bias', 'QKV_BIAS'), ('ape', 'APE'), ('patch_norm', 'PATCH_NORM'),
             ('pretrained_window_sizes', 'PRETRAINED_WINDOW_SIZES'))


def model_opts(model_type: str, model_args: Mapping[str, Any]) -> List[Any]:
    """yacs overrides (``config.merge_from_list``) that describe this model: MODEL.TYPE, DATA.IMG_SIZE,
    MODEL.NUM_CLASSES and the family's section keys present in ``model_args``."""
    section = _SECTIONS[model_type]
    opts: List[Any] = ['MODEL.TYPE', model_type]
    if 'img_size' in model_args:
        opts += ['DATA.IMG_SIZE', _plain(model_args['img_size'])]
    if 'num_classes' in model_args:
        opts += ['MODEL.NUM_CLASSES', int(model_args['num_classes'])]
    for arg, key in _OPT_KEYS:
        skip = (arg == 'qkv_bias' and model_type == 'swin_mlp') or (arg == 'pretrained_window_sizes' and
                                                                    model_type in ('swin', 'swin_mlp'))
        if arg in model_args and not skip:
            opts += [f'MODEL.{section}.{key}', _plain(model_args[arg])]
    return opts


# ----------------------------------------------------------------------------------------- the official zoo

@dataclass(frozen=True)
class ZooEntry:
    """What the official model zoo reports for one released checkpoint (ImageNet-1K validation)."""
    model: str
    acc1: float
    acc5: float
    model_type: str
    embed_dim: int
    depths: Tuple[int, ...]
    img_size: int
    config: str = ''  # its config under configs/ here ('' where this repository has none)


_CONFIG_DIRS = {'swin': 'swin', 'swinv2': 'swinv2', 'swin_mlp': 'swinmlp'}
_NO_CONFIG_HERE = ('swin_tiny_c24_patch4_window8_256',)


def _zoo(stem: str, model: str, acc1: float, acc5: float, size: str, img: int) -> ZooEntry:
    """An entry; family and config follow from the file name: the config that evaluates a file is the one of its
    name, or its ``_finetune`` config where the file is the fine-tuned result (1K at 384, B/L 22K->1K)."""
    model_type = 'swinv2' if stem.startswith('swinv2') else 'swin_mlp' if stem.startswith('swin_mlp') else 'swin'
    name = stem + ('_finetune' if stem.endswith('_22kto1k') or stem == 'swin_base_patch4_window12_384' else '')
    config = '' if stem in _NO_CONFIG_HERE else f'configs/{_CONFIG_DIRS[model_type]}/{name}.yaml'
    embed, depths, _ = _SIZES[size]
    return ZooEntry(model, acc1, acc5, model_type, embed, depths, img, config)


# Figures: microsoft/Swin-Transformer MODELHUB.md, tables "ImageNet-1K and ImageNet-22K Pretrained Swin-V1 Models",
# "... Swin-V2 Models" and "ImageNet-1K Pretrained Swin MLP Models". For a 22K row the figure is the 22K->1K
# fine-tuned model's, the file listed under "1K model". Swin-T/C24 is a Swin V1 with 24 channels per head (heads 4,
# 8, 16, 32); SwinMLP C24 / C12 / C6 likewise.
_ZOO_ROWS = (  # released file name without .pth, model, acc@1, acc@5, size (width, depths), image size
    ('swin_tiny_patch4_window7_224', 'Swin-T 1K', 81.2, 95.5, 'tiny', 224),
    ('swin_small_patch4_window7_224', 'Swin-S 1K', 83.2, 96.2, 'small', 224),
    ('swin_base_patch4_window7_224', 'Swin-B 1K', 83.5, 96.5, 'base', 224),
    ('swin_base_patch4_window12_384', 'Swin-B 1K 384', 84.5, 97.0, 'base', 384),
    ('swin_tiny_patch4_window7_224_22kto1k_finetune', 'Swin-T 22K->1K', 80.9, 96.0, 'tiny', 224),
    ('swin_small_patch4_window7_224_22kto1k_finetune', 'Swin-S 22K->1K', 83.2, 97.0, 'small', 224),
    ('swin_base_patch4_window7_224_22kto1k', 'Swin-B 22K->1K', 85.2, 97.5, 'base', 224),
    ('swin_base_patch4_window12_384_22kto1k', 'Swin-B 22K->1K 384', 86.4, 98.0, 'base', 384),
    ('swin_large_patch4_window7_224_22kto1k', 'Swin-L 22K->1K', 86.3, 97.9, 'large', 224),
    ('swin_large_patch4_window12_384_22kto1k', 'Swin-L 22K->1K 384', 87.3, 98.2, 'large', 384),
    ('swinv2_tiny_patch4_window8_256', 'SwinV2-T w8', 81.8, 95.9, 'tiny', 256),
    ('swinv2_small_patch4_window8_256', 'SwinV2-S w8', 83.7, 96.6, 'small', 256),
    ('swinv2_base_patch4_window8_256', 'SwinV2-B w8', 84.2, 96.9, 'base', 256),
    ('swinv2_tiny_patch4_window16_256', 'SwinV2-T w16', 82.8, 96.2, 'tiny', 256),
    ('swinv2_small_patch4_window16_256', 'SwinV2-S w16', 84.1, 96.8, 'small', 256),
    ('swinv2_base_patch4_window16_256', 'SwinV2-B w16', 84.6, 97.0, 'base', 256),
    ('swinv2_base_patch4_window12to16_192to256_22kto1k_ft', 'SwinV2-B 22K->1K 256', 86.2, 97.9, 'base', 256),
    ('swinv2_base_patch4_window12to24_192to384_22kto1k_ft', 'SwinV2-B 22K->1K 384', 87.1, 98.2, 'base', 384),
    ('swinv2_large_patch4_window12to16_192to256_22kto1k_ft', 'SwinV2-L 22K->1K 256', 86.9, 98.0, 'large', 256),
    ('swinv2_large_patch4_window12to24_192to384_22kto1k_ft', 'SwinV2-L 22K->1K 384', 87.6, 98.3, 'large', 384),
    ('swin_tiny_c24_patch4_window8_256', 'Swin-T/C24', 81.6, 95.7, 'tiny', 256),
    ('swin_mlp_tiny_c24_patch4_window8_256', 'SwinMLP-T/C24', 79.4, 94.6, 'tiny', 256),
    ('swin_mlp_tiny_c12_patch4_window8_256', 'SwinMLP-T/C12', 79.6, 94.7, 'tiny', 256),
    ('swin_mlp_tiny_c6_patch4_window8_256', 'SwinMLP-T/C6', 79.7, 94.9, 'tiny', 256),
    ('swin_mlp_base_patch4_window7_224', 'SwinMLP-B', 81.3, 95.3, 'base', 224),
)
OFFICIAL_ZOO: Dict[str, ZooEntry] = {row[0]: _zoo(*row) for row in _ZOO_ROWS}


def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path).rstrip('/\\'))
    for ext in ('.safetensors', '.pth', '.pt', '.bin'):
        if name.endswith(ext):
            return name[:-len(ext)]
    return name


def zoo_entry(path: str | os.PathLike, state: Optional[Mapping[str, Any]] = None) -> Optional[ZooEntry]:
    """The official zoo's entry for a released checkpoint, recognised by its file name and, given ``state`` (as
    read, any layout), by its keys too: official layout, the entry's family, width and depths, a 1000-class head.
    None when the name is not a released one or the keys contradict it (a renamed file of another model)."""
    entry = OFFICIAL_ZOO.get(_stem(os.fspath(path)))
    if entry is None or state is None:
        return entry
    state = _strip_wrappers(state)
    layout = detect_layout(state)
    if layout.name != 'official' or layout.family != entry.model_type:
        return None
    args = infer_model_args(state, layout.family)
    fits = (args.get('embed_dim') == entry.embed_dim and tuple(args.get('depths', ())) == entry.depths
            and args.get('num_classes') == 1000)
    return entry if fits else None


def zoo_line(entry: ZooEntry, acc1: float, acc5: float) -> str:
    """One log line: the zoo's figures next to the measured ones, and the differences."""
    return (f"official model zoo ({entry.model}): Acc@1 {entry.acc1:.1f} Acc@5 {entry.acc5:.1f}; measured - reported: "
            f"Acc@1 {acc1 - entry.acc1:+.2f} Acc@5 {acc5 - entry.acc5:+.2f}")
