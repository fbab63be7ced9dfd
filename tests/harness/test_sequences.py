"""Task sequences: the embedded digits, and every loader on miniature files written here in the
real formats."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import struct

import numpy as np
import pytest
from PIL import Image

from spg_fast.harness import DataError, DataNotFoundError, build_sequence
from spg_fast.harness import sequences as seqs


def test_digits_split_into_five_binary_tasks():
    seq = build_sequence("digits", seed=0)
    assert seq.input_shape == (64,) and len(seq.tasks) == 5
    total = sum(len(s) for t in seq.tasks for s in (t.train, t.val, t.test))
    assert total == 1797
    for t in seq.tasks:
        assert (
            t.n_classes == 2
            and set(t.train.y.tolist()) == {0, 1}
            and set(t.test.y.tolist()) == {0, 1}
        )
    assert [t.name for t in build_sequence("digits", seed=0).tasks] == [t.name for t in seq.tasks]
    assert [t.name for t in build_sequence("digits", seed=1).tasks] != [t.name for t in seq.tasks]


def test_permuted_digits_use_one_permutation_per_task():
    seq = build_sequence("digits-permuted", seed=0)
    assert len(seq.tasks) == 10 and all(t.n_classes == 10 for t in seq.tasks)
    first, second = seq.tasks[0].test.x, seq.tasks[1].test.x
    assert first.shape == second.shape and not np.array_equal(first.numpy(), second.numpy())
    assert np.allclose(np.sort(first.numpy(), axis=1), np.sort(second.numpy(), axis=1))


def test_unknown_sequence_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown sequence 'mnist'; valid: digits, digits-permuted, fashion-mnist"
    ):
        build_sequence("mnist")


def _idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 200), ("t10k", 60)):
        _idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


@pytest.fixture
def fashion_dir(tmp_path):
    """A --data-dir holding fashion-mnist/."""
    _fashion(tmp_path / "fashion-mnist")
    return tmp_path


def test_fashion_mnist_from_idx_files(fashion_dir):
    seq = build_sequence("fashion-mnist", fashion_dir, seed=0)
    assert seq.input_shape == (1, 28, 28) and len(seq.tasks) == 5
    assert sum(len(t.test) for t in seq.tasks) == 60
    assert seq.tasks[0].train.x.dtype.is_floating_point is False  # uint8, scaled per batch
    assert seq.files == [
        str(fashion_dir / "fashion-mnist" / f"{stem}-ubyte.gz")
        for stem in (
            "train-images-idx3",
            "train-labels-idx1",
            "t10k-images-idx3",
            "t10k-labels-idx1",
        )
    ]


def test_corrupt_idx_file_is_named(fashion_dir):
    bad = fashion_dir / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\0\0\x08\x01" + struct.pack(">I", 500) + b"\0" * 10)
    with pytest.raises(
        DataError, match=re.escape("train-labels-idx1-ubyte.gz: IDX header promises 500 bytes")
    ):
        build_sequence("fashion-mnist", fashion_dir)


def test_given_data_dir_is_the_only_place_looked_at(tmp_path, monkeypatch):
    monkeypatch.setattr(seqs, "FASHION_MNIST_SYSTEM_DIR", _fashion(tmp_path / "debian"))
    with pytest.raises(
        DataNotFoundError,
        match=r"Fashion-MNIST not found: looked for train-images-idx3-ubyte.gz in "
        rf"{tmp_path}/nowhere/fashion-mnist\. Put the files there",
    ):
        build_sequence("fashion-mnist", tmp_path / "nowhere")


def test_without_data_dir_the_system_folder_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seqs, "FASHION_MNIST_SYSTEM_DIR", _fashion(tmp_path / "debian"))
    assert build_sequence("fashion-mnist").files[0] == str(
        tmp_path / "debian" / "train-images-idx3-ubyte.gz"
    )
    _fashion(tmp_path / "data" / "fashion-mnist")  # ./data comes first
    assert build_sequence("fashion-mnist").files[0] == str(
        tmp_path / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    )


def _cifar(root, n_train=300, n_test=100):
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": list(np.arange(n) % 100),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.mark.parametrize("n_tasks", [10, 20])
def test_cifar100_from_the_python_pickles(tmp_path, n_tasks):
    seq = build_sequence(f"cifar100-{n_tasks}", _cifar(tmp_path), seed=3)
    assert seq.input_shape == (3, 32, 32) and len(seq.tasks) == n_tasks
    assert all(t.n_classes == 100 // n_tasks for t in seq.tasks)
    assert sum(len(t.test) for t in seq.tasks) == 100


def test_corrupt_cifar_pickle_is_named(tmp_path):
    root = _cifar(tmp_path)
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"cifar-100-python/test: not a CIFAR-100 python pickle"):
        build_sequence("cifar100-10", root)


def _tinyimagenet(root, n_classes=20, per_class=3):
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(2)
    lines = []
    for k, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                base / "train" / w / "images" / f"{w}_{i}.JPEG", format="JPEG"
            )
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            base / "val" / "images" / f"val_{k}.JPEG", format="JPEG"
        )
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("n_tasks", [10, 20])
def test_tinyimagenet_from_the_folder_layout(tmp_path, n_tasks):
    seq = build_sequence(f"tinyimagenet-{n_tasks}", _tinyimagenet(tmp_path), seed=0)
    assert seq.input_shape == (3, 8, 8) and len(seq.tasks) == n_tasks
    assert sum(len(t.test) for t in seq.tasks) == 20
    assert seq.files[1] == f"{tmp_path}/tiny-imagenet-200/train/<wnid>/images/ (60 images)"


def test_paper_protocol_resizes_tinyimagenet_to_32_pixels_as_the_authors_do(tmp_path):
    seq = build_sequence("tinyimagenet-10", _tinyimagenet(tmp_path), seed=0, protocol="paper")
    assert seq.input_shape == (3, 32, 32) and seq.tasks[0].test.x.shape[1:] == (3, 32, 32)


def test_corrupt_image_is_named(tmp_path):
    root = _tinyimagenet(tmp_path)
    bad = root / "tiny-imagenet-200" / "train" / "n00000004" / "images" / "n00000004_1.JPEG"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=re.escape("n00000004_1.JPEG: cannot read the image")):
        build_sequence("tinyimagenet-10", root)


def test_missing_annotation_file_is_named(tmp_path):
    root = _tinyimagenet(tmp_path)
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=re.escape("val_annotations.txt: cannot read")):
        build_sequence("tinyimagenet-20", root)


def _femnist(root, writers=24):
    rng = np.random.default_rng(4)
    for part, n in (("train", 6), ("test", 2)):
        folder = root / "femnist" / part
        folder.mkdir(parents=True)
        for shard in range(2):
            users = [f"f{shard}_{u}" for u in range(writers // 2)]
            data = {
                u: {
                    "x": rng.random((n, 784)).round(3).tolist(),
                    "y": rng.integers(0, 62, n).tolist(),
                }
                for u in users
            }
            (folder / f"all_data_{shard}.json").write_text(
                json.dumps({"users": users, "num_samples": [n] * len(users), "user_data": data})
            )
    return root


def test_paper_protocol_draws_the_authors_femnist_sizes(tmp_path, monkeypatch):
    root = _femnist(tmp_path)
    with pytest.raises(
        DataError,
        match=r"femnist-10:0 \(3 writers\): the paper protocol takes 3100\+310 training "
        r"and 620 test samples per task; its writers have 18 and 6",
    ):
        build_sequence("femnist-10", root, protocol="paper")
    monkeypatch.setattr(seqs, "FEMNIST_PAPER_SIZES", (8, 2, 4))
    seq = build_sequence("femnist-10", root, seed=1, protocol="paper")
    assert [(len(t.train), len(t.val), len(t.test)) for t in seq.tasks[:2]] == [
        (8, 2, 4),
        (8, 2, 4),
    ]
    assert seq.tasks[0].train.x.shape[1:] == (1, 28, 28)
    everything = build_sequence("femnist-10", root, seed=1)
    pool = {
        tuple(x.flatten().tolist()[:8])
        for s in (everything.tasks[0].train, everything.tasks[0].val)
        for x in s.x
    }
    assert all(
        tuple(x.flatten().tolist()[:8]) in pool for x in seq.tasks[0].train.x
    )  # drawn from its writers


@pytest.mark.parametrize("n_tasks", [10, 20])
def test_femnist_from_leaf_json(tmp_path, n_tasks):
    seq = build_sequence(f"femnist-{n_tasks}", _femnist(tmp_path), seed=0)
    assert seq.input_shape == (1, 28, 28) and len(seq.tasks) == n_tasks
    assert all(t.n_classes == 62 for t in seq.tasks)
    assert sum(len(t.test) for t in seq.tasks) == 24 * 2
    assert seq.tasks[0].train.x.shape[1:] == (1, 28, 28)


def test_corrupt_leaf_json_is_named(tmp_path):
    root = _femnist(tmp_path)
    (root / "femnist" / "train" / "all_data_1.json").write_text('{"users": ["a"]}')
    with pytest.raises(DataError, match=re.escape("all_data_1.json: not a LEAF FEMNIST json file")):
        build_sequence("femnist-10", root)
