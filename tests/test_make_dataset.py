"""tools.make_dataset: an image folder (or the 22K lists) into zip + map, WebDataset shards and Parquet, each read
back in the folder's order with the same bytes and labels; resumable, checking every image, verifiable."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_image_folder
from data.datasets import ImageFolderDataset, ZipMapDataset
from data.zipreader import ZipReader
from tools import dataset_layouts
from tools.make_dataset import Progress, main, parse_size

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # not in requirements.txt: the Parquet checks need it, the rest do not
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pa is None, reason='pyarrow is not installed')
FORMATS = ('zip', 'wds', pytest.param('parquet', marks=needs_pyarrow))


@pytest.fixture(scope='module')
def src(tmp_path_factory) -> Path:
    """3 classes of jpgs, plus a png, a bmp (re-encoded in shards) and a name with dots in it."""
    root = write_image_folder(tmp_path_factory.mktemp('src') / 'folder', num_classes=3, train_per_class=3,
                              val_per_class=2, size=16, ext='jpg')
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / 'train/class_1/scan.v2.bmp')
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).save(root / 'train/class_2/grey.PNG')
    return root


def folder_order(src: Path, split: str) -> list[tuple[str, int]]:
    """(path relative to the split, label) as training lists the folder."""
    classes = ImageFolderDataset(str(src / 'train')).classes
    dataset = ImageFolderDataset(str(src / split), classes=classes)
    return [(os.path.relpath(path, src / split), label) for path, label in dataset.samples]


def convert(src, dst, fmt, *extra) -> int:
    return main(['--format', fmt, str(src), str(dst), '--workers', '0', *extra])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def read_wds(dst: Path, split: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    members = []
    for shard in sorted((dst / split).glob(f'{split}-*.tar')):
        with tarfile.open(shard) as tar:
            members += [(m, tar.extractfile(m).read()) for m in tar]
    return members


def test_zip_layout_reads_back_in_folder_order_through_zipmapdataset(src, tmp_path, capsys):
    assert convert(src, tmp_path / 'zip', 'zip') == 0
    assert sorted(os.listdir(tmp_path / 'zip')) == ['train.zip', 'train_map.txt', 'val.zip', 'val_map.txt']
    assert 'zip' in capsys.readouterr().out.splitlines()[-1]
    for split in ('train', 'val'):
        expected = folder_order(src, split)
        dataset = ZipMapDataset(str(tmp_path / 'zip'), split)
        assert dataset.samples == expected
        with zipfile.ZipFile(tmp_path / 'zip' / f'{split}.zip') as archive:
            assert [i.compress_type for i in archive.infolist()] == [zipfile.ZIP_STORED] * len(expected)
        assert [dataset[i][1] for i in range(len(dataset))] == [label for _, label in expected]
        assert [ZipReader.read_member(dataset.zip_path, rel) for rel, _ in expected] == [
            (src / split / rel).read_bytes() for rel, _ in expected]


def test_wds_shards_hold_images_unchanged_keyed_by_path_in_folder_order(src, tmp_path):
    dst = tmp_path / 'wds'
    assert convert(src, dst, 'wds', '--shard-samples', '4') == 0
    expected = folder_order(src, 'train')
    assert sorted(os.listdir(dst / 'train')) == [f'train-00000{i}.tar' for i in range(3)]  # 11 images, 4 a shard
    assert (dst / 'classes.txt').read_text() == 'class_0\nclass_1\nclass_2\n'
    members = read_wds(dst, 'train')
    assert all((m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o444, 0, 0, '', '') for m, _ in members)
    names = [m.name for m, _ in members]
    assert names[:4] == ['class_0/train_0_0.cls', 'class_0/train_0_0.jpg', 'class_0/train_0_1.cls',
                         'class_0/train_0_1.jpg']
    assert 'class_1/scan_v2.png' in names and 'class_2/grey.png' in names  # dots made '_', extensions lower-case
    for (cls_member, cls), (image_member, data), (rel, label) in zip(members[0::2], members[1::2], expected):
        assert cls == str(label).encode() and cls_member.name == dataset_layouts.wds_key(rel) + '.cls'
        if rel.endswith('.bmp'):  # re-encoded losslessly
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(src / 'train' / rel)))
        else:
            assert data == (src / 'train' / rel).read_bytes()
    assert len(members) == 2 * len(expected)


def test_a_byte_limit_cuts_more_shards_of_the_same_samples(src, tmp_path):
    assert convert(src, tmp_path / 'big', 'wds') == 0
    assert convert(src, tmp_path / 'small', 'wds', '--shard-size', '4KiB') == 0
    small = sorted((tmp_path / 'small' / 'train').iterdir())
    assert len(os.listdir(tmp_path / 'big' / 'train')) == 1 and len(small) > 2
    assert [m.name for m, _ in read_wds(tmp_path / 'small', 'train')] == [
        m.name for m, _ in read_wds(tmp_path / 'big', 'train')]


def test_shard_sizes_take_decimal_and_binary_units():
    assert [parse_size(t) for t in ('1G', '1GB', '500M', '64KiB', '1000', '0')] == [
        10**9, 10**9, 500 * 10**6, 65536, 1000, None]


def test_progress_is_one_line_redrawn_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    progress = Progress('train', total=8, stream=stream)
    progress.close(8, 4000)
    assert stream.getvalue().startswith('\rtrain 100% |' + '#' * 30 + '| 8/8 images, 4.00 KB read, ')
    assert stream.getvalue().endswith(' images/s\n') and stream.getvalue().count('\n') == 1


@needs_pyarrow
def test_parquet_rows_are_hf_image_structs_with_labels_and_class_names(src, tmp_path):
    dst = tmp_path / 'pq'
    assert convert(src, dst, 'parquet', '--shard-samples', '8', '--row-group-size', '3') == 0
    files = sorted((dst / 'train').iterdir())
    assert [f.name for f in files] == ['train-00000.parquet', 'train-00001.parquet']
    first = pq.ParquetFile(files[0])
    assert [first.metadata.row_group(i).num_rows for i in range(first.num_row_groups)] == [3, 3, 2]
    assert first.schema_arrow.field('image').type == pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    assert first.schema_arrow.field('label').type == pa.int64()
    features = json.loads(first.schema_arrow.metadata[b'huggingface'])['info']['features']
    assert features == {'image': {'_type': 'Image'},
                        'label': {'_type': 'ClassLabel', 'names': ['class_0', 'class_1', 'class_2']}}
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    expected = folder_order(src, 'train')
    assert [(r['image']['path'], r['label']) for r in rows] == expected
    assert [r['image']['bytes'] for r in rows] == [(src / 'train' / rel).read_bytes() for rel, _ in expected]
    assert (dst / 'classes.txt').read_text().split() == ['class_0', 'class_1', 'class_2']


class Interrupt(Exception):
    pass


@pytest.mark.parametrize('fmt', FORMATS)
def test_an_interrupted_conversion_resumes_to_the_same_bytes(src, tmp_path, monkeypatch, capsys, fmt):
    options = ['--shard-samples', '3']
    assert convert(src, tmp_path / 'whole', fmt, *options) == 0
    shard_class = {'zip': dataset_layouts.ZipCheckpoint, 'wds': dataset_layouts.TarShard,
                   'parquet': dataset_layouts.ParquetShard}[fmt]
    add, calls = shard_class.add, []

    def failing_add(self, sample):
        calls.append(sample.rel)
        if len(calls) == 5:  # mid-way through the second shard, one sample of it written
            raise Interrupt
        add(self, sample)
    monkeypatch.setattr(shard_class, 'add', failing_add)
    with pytest.raises(Interrupt):
        convert(src, tmp_path / 'resumed', fmt, *options)
    monkeypatch.setattr(shard_class, 'add', add)
    assert (tmp_path / 'resumed' / '.make_dataset.json').exists()
    capsys.readouterr()
    assert convert(src, tmp_path / 'resumed', fmt, '--shard-samples', '4') == 2  # other options: refused
    assert 'shard_samples' in capsys.readouterr().err
    assert convert(src, tmp_path / 'resumed', fmt, *options) == 0
    assert tree(tmp_path / 'resumed') == tree(tmp_path / 'whole')


def test_a_conversion_killed_midway_resumes_to_the_same_bytes(src, tmp_path):
    """SIGKILL in the middle of the zip archive, after its first checkpoint: the rerun truncates to it."""
    options = ['--format', 'zip', '--workers', '0', '--shard-samples', '3']
    assert main([*options, str(src), str(tmp_path / 'whole')]) == 0
    script = ('import os, signal, sys\n'
              'from tools import dataset_layouts as layouts\n'
              'add, calls = layouts.ZipCheckpoint.add, []\n'
              'def killing_add(self, sample):\n'
              '    calls.append(1)\n'
              '    if len(calls) == 6:\n'
              '        os.kill(os.getpid(), signal.SIGKILL)\n'
              '    add(self, sample)\n'
              'layouts.ZipCheckpoint.add = killing_add\n'
              'from tools.make_dataset import main\n'
              'sys.exit(main(sys.argv[1:]))\n')
    killed = subprocess.run([sys.executable, '-c', script, *options, str(src), str(tmp_path / 'resumed')],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.getsize(tmp_path / 'resumed' / '.train.zip.partial') > 0
    assert main([*options, str(src), str(tmp_path / 'resumed')]) == 0
    assert tree(tmp_path / 'resumed') == tree(tmp_path / 'whole')


def _tamper_zip(dst: Path) -> str:
    lines = (dst / 'val_map.txt').read_text().splitlines()
    lines[1] = lines[1].replace('\t0', '\t2')
    (dst / 'val_map.txt').write_text('\n'.join(lines) + '\n')
    return 'label 2, SRC has 0'


def _tamper_wds(dst: Path) -> str:
    shard = dst / 'train' / 'train-000001.tar'
    with tarfile.open(shard) as tar:
        member = [m for m in tar if m.name.endswith('.jpg')][1]
    blob = bytearray(shard.read_bytes())
    blob[member.offset_data + 100] ^= 0xFF
    shard.write_bytes(bytes(blob))
    return f'train-000001.tar:{member.name[:-4]}: bytes differ'


def _tamper_parquet(dst: Path) -> str:
    path = dst / 'train' / 'train-00000.parquet'
    table = pq.read_table(path)
    labels = table.column('label').to_pylist()
    labels[2], labels[3] = labels[3], labels[2]  # the order of two samples of different classes swapped
    images = table.column('image').to_pylist()
    images[2], images[3] = images[3], images[2]
    pq.write_table(pa.table({'image': images, 'label': labels}, schema=table.schema), path)
    return 'train-00000.parquet:row 2: sample class_1/scan.v2.bmp, expected class_0/train_0_2.jpg'


@pytest.mark.parametrize('fmt, tamper', [('zip', _tamper_zip), ('wds', _tamper_wds),
                                         pytest.param('parquet', _tamper_parquet, marks=needs_pyarrow)])
def test_verify_passes_a_fresh_set_and_names_the_first_tampered_sample(src, tmp_path, capsys, fmt, tamper):
    dst = tmp_path / fmt
    assert convert(src, dst, fmt, '--shard-samples', '4') == 0
    capsys.readouterr()
    assert main([str(src), '--verify', str(dst)]) == 0
    assert capsys.readouterr().out.startswith(f'ok: {dst} ({fmt}) holds the 17 images')
    culprit = tamper(dst)
    assert main([str(src), '--verify', str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('mismatch:') and culprit in err[0], err


def test_an_undecodable_image_stops_with_one_line_or_is_left_out_with_skip_bad(src, tmp_path, capsys):
    bad_src = tmp_path / 'src'
    write_image_folder(bad_src, num_classes=2, train_per_class=3, val_per_class=1, size=16, ext='jpg')
    bad = bad_src / 'train' / 'class_0' / 'train_0_1.jpg'
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    assert convert(bad_src, tmp_path / 'wds', 'wds') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {bad}: not a readable image') and '--skip-bad' in err[0]
    # the stopped conversion goes on with --skip-bad, through a worker pool this time
    assert main(['--format', 'wds', str(bad_src), str(tmp_path / 'wds'), '--workers', '2', '--skip-bad']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f'left out: {bad} (') and out[-1].endswith('1 unreadable image left out')
    assert 'train 5 images in 1 shard' in out[-1]
    assert all(not m.name.startswith('class_0/train_0_1.') for m, _ in read_wds(tmp_path / 'wds', 'train'))
    assert main([str(bad_src), '--verify', str(tmp_path / 'wds')]) == 0
    assert '(1 unreadable images of SRC left out)' in capsys.readouterr().out


def test_22k_json_lists_convert_with_their_paths_labels_and_folder_names(src, tmp_path, capsys):
    root = tmp_path / '22k'
    entries = {}
    for split in ('train', 'val'):
        entries[split] = [[f'{rel}', label] for rel, label in folder_order(src, split)]
        for rel, _ in entries[split]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes((src / split / rel).read_bytes())
        (root / f'ILSVRC2011fall_whole_map_{split}.txt').write_text(json.dumps(entries[split]))
    assert convert(root, tmp_path / 'zip', 'zip') == 0
    assert ZipMapDataset(str(tmp_path / 'zip'), 'val').samples == [tuple(e) for e in entries['val']]
    assert convert(root, tmp_path / 'wds', 'wds') == 0
    assert (tmp_path / 'wds' / 'classes.txt').read_text().split() == ['class_0', 'class_1', 'class_2']
    assert [m.name for m, _ in read_wds(tmp_path / 'wds', 'val')][:2] == ['class_0/val_0_0.cls', 'class_0/val_0_0.jpg']
    assert main([str(root), '--verify', str(tmp_path / 'wds')]) == 0
    assert 'holds the 17 images' in capsys.readouterr().out


@pytest.mark.parametrize('case, culprit', [
    ('missing_src', 'SRC not found'), ('no_splits', 'has no train/ or val/ folder'),
    ('dst_not_empty', 'is not empty'), ('format', "--format 'tar'"), ('no_dst', 'name either DST'),
    ('names_collide', 'would both be sample')])
def test_bad_input_is_one_error_line(src, tmp_path, capsys, case, culprit):
    argv = ['--format', 'wds', str(src), str(tmp_path / 'dst'), '--workers', '0']
    if case == 'missing_src':
        argv[2] = str(tmp_path / 'nowhere')
    elif case == 'no_splits':
        (tmp_path / 'empty').mkdir()
        argv[2] = str(tmp_path / 'empty')
    elif case == 'dst_not_empty':
        (tmp_path / 'dst').mkdir()
        (tmp_path / 'dst' / 'notes.txt').write_text('mine')
    elif case == 'format':
        argv[1] = 'tar'
    elif case == 'no_dst':
        argv.pop(3)
    elif case == 'names_collide':
        other = write_image_folder(tmp_path / 'src', num_classes=1, train_per_class=1, val_per_class=1, size=8)
        Image.open(other / 'train/class_0/train_0_0.png').save(other / 'train/class_0/train_0_0.jpg')
        argv[2] = str(other)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error:') and culprit in err[0], err
