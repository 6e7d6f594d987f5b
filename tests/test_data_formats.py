"""DATA.FORMAT wds and parquet: the same images as a folder (and the official zip) give the same samples at the
same indices, so the same batches, the same evaluation on 1 and 2 processes, and the same part caches; shard
indexes are cached and invalidated; shards are found in each published layout and over HTTP or fsspec; bad data
fails as in folders (an undecodable image replaced, a damaged shard or missing column one error up front)."""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cli import fork_ranks, free_port
from shard_sets import write_parquet, write_wds
from test_data_common import data_config, jpeg_folder, zip_layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import parse_command_line  # noqa: E402
from data import build_dataset, build_loader  # noqa: E402
from data.build import build_train_sampler  # noqa: E402
from data.storage import HttpStorage, expand_braces, storage_for  # noqa: E402
from utils.errors import UserError  # noqa: E402

NO_CACHE = {'DATA.CACHE_MODE': 'no'}


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    """The same 3 classes x (4 train, 3 val) JPEGs as a folder, a zip, tar shards (3 of them per split, the last
    short), our Parquet layout (row groups of 2) and the Hugging Face hub's: name -> (root, config overrides)."""
    tmp = tmp_path_factory.mktemp('formats')
    folder = jpeg_folder(tmp / 'folder', num_classes=3, train_per_class=4, val_per_class=3)
    return {
        'folder': (folder, {}),
        'zip': (zip_layout(folder, tmp / 'zip'), {'DATA.ZIP_MODE': True, **NO_CACHE}),
        'wds': (write_wds(folder, tmp / 'wds', per_shard=5), {'DATA.FORMAT': 'wds', **NO_CACHE}),
        'parquet': (write_parquet(folder, tmp / 'parquet', per_file=5, row_group=2),
                    {'DATA.FORMAT': 'parquet', **NO_CACHE}),
        'hub': (write_parquet(folder, tmp / 'hub', per_file=7, row_group=3, hub=True),
                {'DATA.FORMAT': 'parquet', **NO_CACHE}),
    }


def _config(layouts, name, **overrides):
    root, base = layouts[name]
    return data_config(root, **{**base, **overrides})


def _val_batches(cfg) -> list:
    return [(x, y) for x, y in build_loader(cfg)[3]]


def _first_batches(cfg, epoch: int = 1, count: int = 2) -> list:
    loader = build_loader(cfg)[2]
    loader.set_epoch(epoch)
    return [batch for batch, _ in zip(loader, range(count))]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


@pytest.mark.parametrize('repeated_aug', [0, 2])
def test_every_layout_gives_the_folders_samples_classes_and_training_batches(layouts, repeated_aug):
    extra = {'AUG.REPEATED_AUG': repeated_aug, 'DATA.NUM_WORKERS': 1 if repeated_aug else 0}
    expected = _first_batches(_config(layouts, 'folder', **extra))
    reference = build_dataset(True, _config(layouts, 'folder'))[0]
    for name in ('zip', 'wds', 'parquet', 'hub'):
        dataset = build_dataset(True, _config(layouts, name))[0]
        assert dataset.targets == reference.targets and dataset.classes == reference.classes, name
        assert _same(_first_batches(_config(layouts, name, **extra)), expected), name


def test_every_layout_gives_the_folders_evaluation_batches(layouts):
    expected = _val_batches(_config(layouts, 'folder'))
    assert sum(len(y) for _, y in expected) == 9
    for name in ('zip', 'wds', 'parquet', 'hub'):
        assert _same(_val_batches(_config(layouts, name)), expected), name


@pytest.mark.parametrize('name', ['wds', 'parquet'])
def test_full_and_part_caches_hold_the_same_bytes_as_the_shards(layouts, name):
    for rank in (0, 1):  # part: rank r holds indices r, r + 2, ... and its sampler draws only those
        cfg = _config(layouts, name, **{'DATA.CACHE_MODE': 'part'})
        dataset = build_dataset(True, cfg, rank=rank, world=2)[0]
        assert dataset._cache.cached_indices() == list(range(rank, 12, 2))
        sampler = build_train_sampler(cfg, dataset, rank, 2)
        assert set(sampler) == set(range(rank, 12, 2))
    cfg = _config(layouts, name, **{'DATA.CACHE_MODE': 'full'})
    expected = _val_batches(_config(layouts, 'folder'))
    dataset_val = build_loader(cfg)[1]
    assert dataset_val._cache.cached_indices() == list(range(9))
    assert _same(_val_batches(cfg), expected)


# -- 2 processes: one spawn serves the evaluation of every layout ------------------------------------------------

def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(32, 6)).eval()


def _evaluate(cfg) -> dict:
    """Logits by validation index, and Acc@1 / Acc@5 as the engine computes them (summed over the ranks)."""
    from engine import validate
    loader = build_loader(cfg)[3]
    model, indices, logits = _model(), [], []
    with torch.no_grad():
        for (images, _), keys in zip(loader, _batched(loader.sampler.indices, cfg.DATA.BATCH_SIZE)):
            logits.append(model(images))
            indices += keys
    acc1, acc5, _ = validate(cfg, loader, model, torch.device('cpu'), None, logging.getLogger('formats'))
    return {'indices': indices, 'logits': torch.cat(logits), 'acc': (acc1, acc5)}


def _batched(items: list, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _rank_worker(rank: int, port: int, out: str, configs: dict) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        torch.save({name: _evaluate(cfg) for name, cfg in configs.items()}, os.path.join(out, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_every_layout_evaluates_identically_on_1_and_2_processes(layouts, tmp_path):
    configs = {name: _config(layouts, name, **{'PRINT_FREQ': 100}) for name in layouts}
    configs['wds part cache'] = _config(layouts, 'wds', **{'DATA.CACHE_MODE': 'part', 'PRINT_FREQ': 100})
    one = {name: _evaluate(cfg) for name, cfg in configs.items()}
    fork_ranks(_rank_worker, (free_port(), str(tmp_path), configs))
    ranks = [torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in (0, 1)]
    expected = one['folder']
    assert expected['indices'] == list(range(9))
    for name in configs:
        assert torch.equal(one[name]['logits'], expected['logits']) and one[name]['acc'] == expected['acc'], name
        both = sorted(zip(ranks[0][name]['indices'] + ranks[1][name]['indices'],
                          torch.cat([ranks[0][name]['logits'], ranks[1][name]['logits']])), key=lambda p: p[0])
        assert [i for i, _ in both] == list(range(9)), name  # each image once over the 2 ranks
        assert torch.equal(torch.stack([row for _, row in both]), expected['logits']), name
        assert ranks[0][name]['acc'] == ranks[1][name]['acc'] == expected['acc'], name


# -- the shard index -------------------------------------------------------------------------------------------

def _copy(layouts, name: str, dst: Path) -> Path:
    shutil.copytree(layouts[name][0], dst, ignore=shutil.ignore_patterns('.index'))
    return dst


def test_the_shard_index_is_built_once_cached_beside_the_shards_and_rebuilt_when_a_shard_changes(
        layouts, tmp_path, monkeypatch):
    import data.wds
    root = _copy(layouts, 'wds', tmp_path / 'wds')
    calls = []
    real = data.wds.index_tar
    monkeypatch.setattr(data.wds, 'index_tar', lambda *args: calls.append(args[1]) or real(*args))
    cfg = data_config(root, **{'DATA.FORMAT': 'wds', **NO_CACHE})
    build_loader(cfg)
    assert len(calls) == 5 and len(list((root / 'train' / '.index').glob('*.npz'))) == 3
    calls.clear()
    build_loader(cfg)
    assert calls == []
    shard = root / 'train' / 'train-000001.tar'
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    build_loader(cfg)
    assert calls == [str(shard)]


def test_a_read_only_shard_folder_gets_its_index_in_the_output_folder(layouts, tmp_path):
    root = _copy(layouts, 'wds', tmp_path / 'wds')
    for split in ('train', 'val'):
        (root / split / '.index').write_text('')  # the place beside the shards cannot be made (root too)
    out = tmp_path / 'out'
    build_loader(data_config(root, **{'DATA.FORMAT': 'wds', 'OUTPUT': str(out), **NO_CACHE}))
    assert len(list(out.glob('data_index/*/*.tar.npz'))) == 5


# -- finding the shards ----------------------------------------------------------------------------------------

def test_shards_are_found_as_published_sets_name_them_or_as_named(layouts, tmp_path):
    wds = layouts['wds'][0]
    expected = build_dataset(True, _config(layouts, 'folder'))[0].targets
    flat = tmp_path / 'flat'  # timm/imagenet-1k-wds: shards in the root, class names in _info.json
    flat.mkdir()
    for split, published in (('train', 'train'), ('val', 'validation')):
        for i, shard in enumerate(sorted((wds / split).glob('*.tar'))):
            shutil.copy(shard, flat / f'imagenet1k-{published}-{i:04d}.tar')
    (flat / '_info.json').write_text(json.dumps({'classes': ['a', 'b', 'c']}))
    dataset = build_dataset(True, data_config(flat, **{'DATA.FORMAT': 'wds'}))[0]
    assert dataset.targets == expected and dataset.classes == ['a', 'b', 'c']
    # 22K: the labels come from the data; a brace pattern names a subset of the shards
    cfg = data_config(wds, **{'DATA.FORMAT': 'wds', 'DATA.DATASET': 'imagenet22K',
                              'DATA.TRAIN_SHARDS': 'train/train-{000000..000001}.tar'})
    assert build_dataset(True, cfg)[0].targets == expected[:10]
    with pytest.raises(UserError, match='DATA.VAL_SHARDS'):
        build_dataset(False, data_config(tmp_path / 'flat', **{'DATA.FORMAT': 'parquet'}))


def test_brace_patterns_expand_as_webdatasets():
    assert expand_braces('t-{000..002}.tar') == ['t-000.tar', 't-001.tar', 't-002.tar']
    assert expand_braces('{a,b}/s-{8..10}.tar') == ['a/s-8.tar', 'a/s-9.tar', 'a/s-10.tar', 'b/s-8.tar',
                                                    'b/s-9.tar', 'b/s-10.tar']


def test_data_format_flag_and_its_conflict_with_zip(tmp_path):
    cfg_file = tmp_path / 'c.yaml'
    cfg_file.write_text('')
    assert parse_command_line(['--cfg', str(cfg_file), '--data-format', 'wds'])[1].DATA.FORMAT == 'wds'
    assert parse_command_line(['--cfg', str(cfg_file), '--zip', '--data-format', 'zip'])[1].DATA.ZIP_MODE
    with pytest.raises(UserError, match='--zip .* conflicts with DATA.FORMAT parquet'):
        parse_command_line(['--cfg', str(cfg_file), '--zip', '--data-format', 'parquet'])


# -- remote shards ---------------------------------------------------------------------------------------------

class _RangeHandler(SimpleHTTPRequestHandler):
    """The standard file server plus ``Range: bytes=a-b`` (206 Partial Content), as object stores serve."""

    def do_GET(self):
        match = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range', ''))
        if match is None:
            return super().do_GET()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        size = os.path.getsize(path)
        start, end = int(match.group(1)), min(int(match.group(2)), size - 1)
        with open(path, 'rb') as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header('Content-Range', f'bytes {start}-{end}/{size}')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(layouts):
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_RangeHandler, directory=str(
        layouts['wds'][0].parent)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_shards_read_over_http_evaluate_and_train_as_the_local_files(layouts, http_root, tmp_path):
    expected_val = _val_batches(_config(layouts, 'folder'))
    expected_train = _first_batches(_config(layouts, 'folder'))
    out = tmp_path / 'out'
    shards = {'wds': ('train/train-{000000..000002}.tar', 'val/val-{000000..000001}.tar'),
              'parquet': ('train/train-{00000..00002}.parquet', 'val/val-{00000..00001}.parquet')}
    for name, (train, val) in shards.items():
        cfg = data_config(f'{http_root}/{name}', **{'DATA.FORMAT': name, 'DATA.TRAIN_SHARDS': train,
                                                    'DATA.VAL_SHARDS': val, 'OUTPUT': str(out), **NO_CACHE})
        assert _same(_val_batches(cfg), expected_val), name
        assert _same(_first_batches(cfg), expected_train), name
        assert build_dataset(False, cfg)[0].classes == ['class_0', 'class_1', 'class_2']
    assert len(list(out.glob('data_index/*/*.tar.npz'))) == 5  # the index of remote shards: in the output folder
    with pytest.raises(UserError, match='HTTP cannot list'):
        build_dataset(True, data_config(f'{http_root}/wds', **{'DATA.FORMAT': 'wds'}))


def test_shards_read_through_fsspec_evaluate_as_the_local_files(layouts, tmp_path):
    fsspec = pytest.importorskip('fsspec')
    memory = fsspec.filesystem('memory')
    root = layouts['wds'][0]
    try:
        for path in root.rglob('*'):
            if path.is_file() and '.index' not in path.parts:
                memory.pipe(f'/wds_test/{path.relative_to(root).as_posix()}', path.read_bytes())
        cfg = data_config('memory://wds_test', **{'DATA.FORMAT': 'wds', 'OUTPUT': str(tmp_path), **NO_CACHE})
        assert _same(_val_batches(cfg), _val_batches(_config(layouts, 'folder')))
    finally:
        memory.rm('/wds_test', recursive=True)


def test_a_url_without_fsspec_is_one_error_saying_to_install_it_but_http_still_reads(monkeypatch):
    monkeypatch.setitem(sys.modules, 'fsspec', None)
    with pytest.raises(UserError, match=r's3://bucket/set is a URL: reading it needs the fsspec package'):
        storage_for('s3://bucket/set')
    assert isinstance(storage_for('https://example.org/set'), HttpStorage)


# -- bad data --------------------------------------------------------------------------------------------------

def _break_image(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:20] + b'\x00garbage' * 40)


@pytest.fixture
def damaged(tmp_path):
    """A folder with one corrupt training and one corrupt validation image, as tar shards and Parquet."""
    folder = jpeg_folder(tmp_path / 'folder', num_classes=3, train_per_class=4, val_per_class=2, size=32)
    _break_image(folder / 'train' / 'class_1' / 'train_1_2.jpg')
    _break_image(folder / 'val' / 'class_2' / 'val_2_0.jpg')
    return {'wds': write_wds(folder, tmp_path / 'wds', per_shard=5),
            'parquet': write_parquet(folder, tmp_path / 'parquet', per_file=5, row_group=2)}


@pytest.mark.parametrize('name', ['wds', 'parquet'])
def test_an_undecodable_image_is_replaced_in_training_named_once_and_black_in_validation(damaged, name, caplog):
    cfg = data_config(damaged[name], **{'DATA.FORMAT': name, 'DATA.MAX_BAD_FRACTION': 0.5, **NO_CACHE})
    _, _, loader_train, loader_val, _ = build_loader(cfg)
    where = {'wds': 'train-000001.tar@/class_1/train_1_2.jpg', 'parquet': 'train-00001.parquet@row 1'}[name]
    with caplog.at_level(logging.WARNING, logger='data.loader'):
        for epoch in (0, 1):
            loader_train.set_epoch(epoch)
            assert [len(y) for _, y in loader_train] == [4, 4, 4]
        targets = torch.cat([y for _, y in loader_val])
    assert loader_train.bad_files == {str(damaged[name] / 'train' / where)}
    assert caplog.text.count(f'unreadable image skipped: {damaged[name]}') == 2  # train and val, once each
    assert targets.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(UserError, match='DATA.MAX_BAD_FRACTION=0.05'):
        loader = build_loader(data_config(damaged[name], **{'DATA.FORMAT': name, 'DATA.MAX_BAD_FRACTION': 0.05,
                                                            **NO_CACHE}))[2]
        loader.set_epoch(0)
        list(loader)


def _truncate(shard: Path, how: str) -> None:
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    cut = {'mid-member': data[:last.offset_data + last.size // 2], 'at a member end': data[:end],
           'damaged header': data[:last.offset] + b'\x07' * 512 + data[last.offset + 512:]}[how]
    shard.write_bytes(cut)


@pytest.mark.parametrize('how', ['mid-member', 'at a member end', 'damaged header'])
def test_a_truncated_or_damaged_shard_is_one_error_naming_it_before_training(layouts, tmp_path, how):
    root = _copy(layouts, 'wds', tmp_path / 'wds')
    _truncate(root / 'val' / 'val-000001.tar', how)
    with pytest.raises(UserError, match=re.escape(f'{root / "val" / "val-000001.tar"}: truncated or damaged')):
        build_loader(data_config(root, **{'DATA.FORMAT': 'wds'}))


def test_missing_shards_labels_and_columns_are_one_error_naming_them(layouts, tmp_path):
    wds, parquet = layouts['wds'][0], layouts['parquet'][0]
    with pytest.raises(UserError, match=re.escape(f'shard not found or unreadable: {wds / "val" / "val-000002.tar"}')):
        build_loader(data_config(wds, **{'DATA.FORMAT': 'wds', 'DATA.VAL_SHARDS': 'val/val-{000000..000009}.tar'}))
    with pytest.raises(UserError, match=r"train-00000.parquet: no column 'cls' .*DATA.PARQUET_LABEL_COLUMN"):
        build_loader(data_config(parquet, **{'DATA.FORMAT': 'parquet', 'DATA.PARQUET_LABEL_COLUMN': 'cls'}))
    with pytest.raises(UserError, match=re.escape(f'Parquet file not found: {parquet / "val" / "nope.parquet"}')):
        build_loader(data_config(parquet, **{'DATA.FORMAT': 'parquet', 'DATA.VAL_SHARDS': 'val/nope.parquet'}))
    cut = _copy(layouts, 'parquet', tmp_path / 'parquet') / 'val' / 'val-00001.parquet'
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(UserError, match=re.escape(f'{cut}: not a readable Parquet file')):
        build_loader(data_config(cut.parent.parent, **{'DATA.FORMAT': 'parquet'}))
    unlabelled = tmp_path / 'unlabelled.tar'
    with tarfile.open(unlabelled, 'w') as tar:
        tar.add(next((wds.parent / 'folder' / 'val' / 'class_0').iterdir()), 'a/x.jpg')
    with pytest.raises(UserError, match=r"unlabelled.tar: sample 'a/x' has an image but no .cls label"):
        build_loader(data_config(wds, **{'DATA.FORMAT': 'wds', 'DATA.VAL_SHARDS': str(unlabelled)}))


def test_simmim_pretraining_reads_the_training_shards(layouts):
    from data.simmim import build_loader_simmim
    for name in ('wds', 'parquet'):
        dataset, loader = build_loader_simmim(_config(layouts, name, **{'DATA.MASK_PATCH_SIZE': 8}))
        assert len(dataset) == 12 and type(dataset).__name__ != 'ImageFolderDataset'
        loader.set_epoch(0)
        images, masks = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 8, 8)


def test_parquet_rows_decoded_a_few_at_a_time_in_any_order_are_the_folders(layouts, monkeypatch):
    from data.parquet import ParquetDataset
    monkeypatch.setattr(ParquetDataset, 'rows_per_batch', 1)  # several batches per row group
    monkeypatch.setattr(ParquetDataset, 'row_groups_kept', 1)  # random order: groups decoded again and again
    expected = _first_batches(_config(layouts, 'folder'), count=3)
    for name in ('parquet', 'hub'):
        assert _same(_first_batches(_config(layouts, name), count=3), expected), name


def test_a_cache_larger_than_the_available_memory_is_one_error_before_filling(layouts, monkeypatch):
    import data.datasets
    share = build_dataset(True, _config(layouts, 'wds'))[0]._stored_size(range(0, 12, 4))  # rank 0 of 4
    monkeypatch.setattr(data.datasets, '_available_memory', lambda: 2 * share)
    cfg = _config(layouts, 'wds', **{'DATA.CACHE_MODE': 'part'})
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # 4 ranks on this machine: 4 shares
    with pytest.raises(UserError, match=r'DATA.CACHE_MODE part: caching 3 tar shards .* use --cache-mode no'):
        build_dataset(True, cfg, rank=0, world=4)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert build_dataset(True, cfg, rank=0, world=4)[0]._cache.cached_indices() == [0, 4, 8]
