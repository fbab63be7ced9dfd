"""Task sequences for task-incremental continual learning: one head per task, task id known at
test time.

``build_sequence(name, data_dir=None, seed=0, protocol="quick")`` returns a ``TaskSequence``;
``SEQUENCES`` lists the names. Class orders, writer groups, pixel permutations and validation splits
are drawn from ``seed``. Files are read from ``data_dir`` (default ``./data``) only; Fashion-MNIST
alone falls back to the system folder when no ``data_dir`` is given. ``protocol="paper"`` applies
the authors' data settings (TinyImageNet resized to 32x32, FEMNIST's fixed sample counts per task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spg_fast.harness.formats import (
    DataError,
    read_cifar100,
    read_idx,
    read_image,
    read_leaf_json,
    read_text,
    require_dir,
)

DEFAULT_DATA_DIR = Path("data")
# Debian's dataset-fashion-mnist package; used only when no data_dir is given.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# The authors' FEMNIST sizes per task: 50 training, 5 validation and 10 test samples per class,
# 62 classes.
FEMNIST_PAPER_SIZES = (50 * 62, 5 * 62, 10 * 62)


@dataclass
class Split:
    x: Tensor  # uint8 images (scaled to [0, 1] per batch) or float32 features
    y: Tensor  # int64 labels, 0..n_classes-1 within the task

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Task:
    name: str
    n_classes: int
    train: Split
    val: Split
    test: Split


@dataclass
class TaskSequence:
    """A task sequence, as ``build_sequence`` returns it.

    Attributes:
        name: the sequence's name (a key of ``SEQUENCES``).
        input_shape: the shape of one input: ``(features,)`` or ``(channels, height, width)``.
        tasks: the tasks in the order they are learnt, each with its training, validation and
            test splits and its number of classes.
        files: what was read, for ``results.json``.
        image_shape: how conv backbones read vector inputs (None: inputs are images).
    """

    name: str
    input_shape: tuple[int, ...]
    tasks: list[Task]
    files: list[str] = field(default_factory=list)  # what was read, for results.json
    image_shape: tuple[int, ...] | None = None  # how conv backbones read vector inputs


Builder = Callable[[Path | None, int, bool], TaskSequence]


def _split_off(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator):
    """Split ``fraction`` of the samples off, stratified by label."""
    take = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        take[idx[: max(1, round(fraction * len(idx)))] if len(idx) > 1 else []] = True
    return (x[~take], y[~take]), (x[take], y[take])


def _task(
    name: str, n_classes: int, train, test, rng: np.random.Generator, val_fraction: float
) -> Task:
    (xt, yt), (xv, yv) = _split_off(*train, val_fraction, rng)
    as_split = lambda x, y: Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))  # noqa: E731
    return Task(name, n_classes, as_split(xt, yt), as_split(xv, yv), as_split(*test))


def class_split(
    name: str, train, test, n_tasks: int, seed: int, val_fraction: float = 0.1
) -> list[Task]:
    """Disjoint groups of classes (seeded order), labels remapped to 0..k-1 within each task."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(train[1]))
    if len(classes) % n_tasks:
        raise ValueError(f"{name}: {len(classes)} classes do not split into {n_tasks} equal tasks")
    tasks = []
    for t, group in enumerate(np.split(classes, n_tasks)):
        remap = {int(c): i for i, c in enumerate(group)}

        def pick(x, y, group=group, remap=remap):
            keep = np.isin(y, group)
            return x[keep], np.array([remap[int(c)] for c in y[keep]], dtype=np.int64)

        tasks.append(
            _task(
                f"{name}:{t} classes {group.tolist()}",
                len(group),
                pick(*train),
                pick(*test),
                rng,
                val_fraction,
            )
        )
    return tasks


def _digits(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return _split_off(x, y.astype(np.int64), 0.25, np.random.default_rng(seed + 10_000))


DIGITS_FILES = ["scikit-learn's bundled digits (sklearn.datasets.load_digits)"]


def digits(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
    """scikit-learn's bundled digits (1,797 8x8 images) in 5 tasks of 2 classes."""
    train, test = _digits(seed)
    return TaskSequence(
        "digits",
        (64,),
        class_split("digits", train, test, 5, seed, val_fraction=0.15),
        DIGITS_FILES,
        (1, 8, 8),
    )


def digits_permuted(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
    """The digits in 10 tasks of all 10 classes, each with its own fixed pixel permutation (task
    0 none)."""
    (xtr, ytr), (xte, yte) = _digits(seed)
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(10):
        perm = np.arange(64) if t == 0 else rng.permutation(64)
        tasks.append(
            _task(f"digits-permuted:{t}", 10, (xtr[:, perm], ytr), (xte[:, perm], yte), rng, 0.15)
        )
    return TaskSequence("digits-permuted", (64,), tasks, DIGITS_FILES, (1, 8, 8))


IDX_STEMS = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")


def fashion_mnist(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
    """Fashion-MNIST (its four IDX files) in 5 tasks of 2 classes."""
    candidates = [(data_dir or DEFAULT_DATA_DIR) / "fashion-mnist"] + (
        [] if data_dir else [FASHION_MNIST_SYSTEM_DIR]
    )
    folder = require_dir("Fashion-MNIST", candidates, "train-images-idx3-ubyte.gz")
    files = [folder / f"{stem}-ubyte.gz" for stem in IDX_STEMS]
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    train, test = (xtr[:, None], ytr.astype(np.int64)), (xte[:, None], yte.astype(np.int64))
    for (x, y), stem in ((train, "train"), (test, "t10k")):
        if len(x) != len(y):
            raise DataError(
                f"{folder}: {stem} images ({len(x)}) and labels ({len(y)}) differ in number"
            )
    return TaskSequence(
        "fashion-mnist",
        (1, 28, 28),
        class_split("fashion-mnist", train, test, 5, seed),
        [str(f.resolve()) for f in files],
    )


def cifar100(n_tasks: int) -> Builder:
    def build(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
        """CIFAR-100 (the python pickle release, folder ``cifar-100-python``) in equal tasks of
        classes; 10% of each class's training images (the authors' 50 of 500) validate."""
        root = require_dir("CIFAR-100", [data_dir or DEFAULT_DATA_DIR], "cifar-100-python/train")
        files = [root / "cifar-100-python" / part for part in ("train", "test")]
        train, test = (read_cifar100(f) for f in files)
        name = f"cifar100-{n_tasks}"
        return TaskSequence(
            name,
            (3, 32, 32),
            class_split(name, train, test, n_tasks, seed),
            [str(f.resolve()) for f in files],
        )

    return build


def _read_tinyimagenet(
    root: Path, size: int | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    wnids_file = root / "wnids.txt"
    wnids = read_text(wnids_file).split()
    index = {w: i for i, w in enumerate(wnids)}
    xs, ys = [], []
    for w in wnids:
        files = sorted((root / "train" / w / "images").glob("*"))
        if not files:
            raise DataError(f"{root / 'train' / w / 'images'}: no training images for class {w}")
        xs += [read_image(f, size) for f in files]
        ys += [index[w]] * len(files)
    annotations = root / "val" / "val_annotations.txt"
    vx, vy = [], []
    for n, line in enumerate(read_text(annotations).splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(
                f"{annotations}:{n}: expected 'file<TAB>wnid...' with a wnid of wnids.txt"
            )
        vx.append(read_image(root / "val" / "images" / fields[0], size))
        vy.append(index[fields[1]])
    return (np.stack(xs), np.array(ys, dtype=np.int64)), (
        np.stack(vx),
        np.array(vy, dtype=np.int64),
    )


def tinyimagenet(n_tasks: int) -> Builder:
    def build(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
        """TinyImageNet (folder ``tiny-imagenet-200``: wnids.txt, train/<wnid>/images, val/images
        with val_annotations.txt, which serves as the test set) in equal tasks of classes; the paper
        protocol resizes the images to 32x32 (bicubic), as the authors do."""
        root = require_dir(
            "TinyImageNet", [data_dir or DEFAULT_DATA_DIR], "tiny-imagenet-200/wnids.txt"
        )
        base = (root / "tiny-imagenet-200").resolve()
        train, test = _read_tinyimagenet(base, 32 if paper else None)
        name = f"tinyimagenet-{n_tasks}"
        files = [
            f"{base / 'wnids.txt'}",
            f"{base / 'train'}/<wnid>/images/ ({len(train[1])} images)",
            f"{base / 'val' / 'val_annotations.txt'}",
            f"{base / 'val' / 'images'}/ ({len(test[1])} images)",
        ]
        return TaskSequence(
            name, tuple(train[0].shape[1:]), class_split(name, train, test, n_tasks, seed), files
        )

    return build


def _sample(task: Task, sizes: tuple[int, int, int], rng: np.random.Generator) -> Task:
    """``sizes`` = (train, validation, test) samples drawn without replacement from the
    task's own."""
    pool_x = torch.cat([task.train.x, task.val.x])
    pool_y = torch.cat([task.train.y, task.val.y])
    if len(pool_y) < sizes[0] + sizes[1] or len(task.test) < sizes[2]:
        raise DataError(
            f"{task.name}: the paper protocol takes {sizes[0]}+{sizes[1]} training and {sizes[2]} "
            f"test samples per task; its writers have {len(pool_y)} and {len(task.test)}"
        )
    idx = torch.from_numpy(rng.permutation(len(pool_y))[: sizes[0] + sizes[1]])
    test = torch.from_numpy(rng.permutation(len(task.test))[: sizes[2]])
    train, val = idx[: sizes[0]], idx[sizes[0] :]
    return Task(
        task.name,
        task.n_classes,
        Split(pool_x[train], pool_y[train]),
        Split(pool_x[val], pool_y[val]),
        Split(task.test.x[test], task.test.y[test]),
    )


def femnist(n_tasks: int) -> Builder:
    def build(data_dir: Path | None, seed: int, paper: bool) -> TaskSequence:
        """Federated EMNIST (LEAF json files under ``femnist/train`` and ``femnist/test``):
        writers split into ``n_tasks`` disjoint seeded groups, each task all 62 classes of its
        writers; the paper protocol draws the authors' 3,100 training, 310 validation and 620 test
        samples per task."""
        root = require_dir("FEMNIST", [data_dir or DEFAULT_DATA_DIR], "femnist/train")
        parts = {}
        read = []
        for part in ("train", "test"):
            files = sorted((root / "femnist" / part).glob("*.json"))
            if not files:
                raise DataError(f"{root / 'femnist' / part}: no LEAF .json files")
            parts[part] = {u: d for f in files for u, d in read_leaf_json(f).items()}
            read += [str(f.resolve()) for f in files]
        writers = sorted(parts["train"].keys() & parts["test"].keys())
        if len(writers) < n_tasks:
            raise DataError(
                f"{root / 'femnist'}: {len(writers)} writers with train and test "
                f"data; need {n_tasks}"
            )
        rng = np.random.default_rng(seed)
        tasks = []
        for t, group in enumerate(np.array_split(rng.permutation(writers), n_tasks)):
            join = lambda part, group=group: tuple(  # noqa: E731
                np.concatenate([parts[part][u][i] for u in group]) for i in (0, 1)
            )
            tasks.append(
                _task(
                    f"femnist-{n_tasks}:{t} ({len(group)} writers)",
                    62,
                    join("train"),
                    join("test"),
                    rng,
                    0.1,
                )
            )
        if paper:
            tasks = [_sample(task, FEMNIST_PAPER_SIZES, rng) for task in tasks]
        return TaskSequence(
            f"femnist-{n_tasks}", (1, 28, 28), [_reshaped(task) for task in tasks], read
        )

    return build


def _reshaped(task: Task) -> Task:
    for split in (task.train, task.val, task.test):
        split.x = split.x.reshape(-1, 1, 28, 28)
    return task


SEQUENCES: dict[str, Builder] = {
    "digits": digits,
    "digits-permuted": digits_permuted,
    "fashion-mnist": fashion_mnist,
    "cifar100-10": cifar100(10),
    "cifar100-20": cifar100(20),
    "tinyimagenet-10": tinyimagenet(10),
    "tinyimagenet-20": tinyimagenet(20),
    "femnist-10": femnist(10),
    "femnist-20": femnist(20),
}


EMBEDDED = ("digits", "digits-permuted")


def build_sequence(
    name: str, data_dir: str | Path | None = None, seed: int = 0, protocol: str = "quick"
) -> TaskSequence:
    """The task sequence ``name`` (one of ``SEQUENCES``); ``data_dir`` is where its files are
    (the embedded digits sequences read none); ``protocol`` ``"paper"`` applies the authors'
    data settings.

    Args:
        name: the sequence, a key of ``SEQUENCES``.
        data_dir: the folder holding the data files (None: ``./data``; Fashion-MNIST also looks
            in the system folder).
        seed: seeds the class orders, writer groups, pixel permutations and validation splits.
        protocol: ``"quick"`` or ``"paper"``.

    Returns:
        The ``TaskSequence``.

    Raises:
        ValueError: an unknown sequence or protocol.
        DataNotFoundError: the data files are not in ``data_dir``.
        DataError: a data file is unreadable or not in the expected format.
    """
    if name not in SEQUENCES:
        raise ValueError(f"unknown sequence {name!r}; valid: {', '.join(SEQUENCES)}")
    if protocol not in ("quick", "paper"):
        raise ValueError(f"unknown protocol {protocol!r}; valid: quick, paper")
    return SEQUENCES[name](Path(data_dir) if data_dir else None, seed, protocol == "paper")
