"""Readers for the on-disk formats of the supported data sets. Each returns uint8 or float32
arrays and raises ``DataError`` naming the file when a file is missing, truncated or not in the
expected format."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file that is missing, unreadable or not in the expected format (the message
    names it)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No copy of a data set where it was looked for (the message says where, and what to
    put there)."""


def require_dir(name: str, candidates: list[Path], expected: str) -> Path:
    """The first candidate folder that holds ``expected`` (a relative path), else
    a ``DataNotFoundError``."""
    for folder in candidates:
        if (folder / expected).exists():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"{name} not found: looked for {expected} in {looked}. Put the files there, or pass "
        "--data-dir (data_dir=) naming the folder that holds them (see the README's table)."
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST layout, optionally gzipped): unsigned-byte data of any rank."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(
            f"{path}: IDX header promises {count} bytes of data, the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_cifar100(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-100 python pickle (``train`` or ``test``): images (N, 3, 32, 32) uint8 and
    fine labels."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-100 python pickle ({type(e).__name__}: {e})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"{path}: expected data of shape (N, 3072) and N labels, got "
            f"{data.shape}, {len(labels)}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """An image file as (3, H, W) uint8 RGB, resized (bicubic) to ``size`` x ``size`` when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e


def read_leaf_json(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One LEAF json file: per writer, its flattened 28x28 images (float32 in [0, 1]) and labels."""
    try:
        with open(path) as f:
            blob = json.load(f)
        out = {}
        for user in blob["users"]:
            record = blob["user_data"][user]
            x = np.asarray(record["x"], dtype=np.float32)
            y = np.asarray(record["y"], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
                raise ValueError(f"writer {user!r}: x of shape {x.shape} and {len(y)} labels")
            out[user] = (x, y)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a LEAF FEMNIST json file ({type(e).__name__}: {e})") from e
    return out
