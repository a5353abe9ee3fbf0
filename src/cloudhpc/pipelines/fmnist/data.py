"""The data of the example: Fashion-MNIST when it can be fetched, scikit-learn's digits when not.

The original pickled PyTorch DataLoader objects into object storage and, in two of its versions,
evaluated on the training set or trained on the test set. Here the preprocess step writes plain
arrays (`.npz`, never pickles) in two separate objects: `train.npz` holds the training and
validation splits and is all the training job ever receives; `test.npz` holds the held-out test
split and is read only by the evaluation step. A mix-up is then not a slip of one variable name
but would need a different object URL.

Fashion-MNIST is read in its published IDX format (`train-images-idx3-ubyte.gz` and the three
other files) from a base URL: `https://...`, `s3://bucket/prefix` or `file:///dir`. Its official
test split stays the test split; the validation split is carved out of its training split.

Offline (no URL given, or the URL cannot be reached, as in tests and CI) the same pipeline runs on
the 1,797 8x8 digits bundled with scikit-learn, upsampled to 28x28 so the same network applies,
split train/validation/test the same way. `DataSource.note` says so in plain words, and every step
prints it, so a digits accuracy is never mistaken for a Fashion-MNIST one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import numpy.typing as npt

__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_FILES",
    "DataSource",
    "Splits",
    "digits_dataset",
    "fetch_fmnist",
    "load_dataset",
    "load_test_split",
    "load_train_splits",
    "parse_idx",
    "read_url",
    "split_dataset",
    "write_splits",
]

log = logging.getLogger(__name__)

FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGITS_CLASSES = [str(d) for d in range(10)]

FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}

IMAGE_SIDE = 28

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DataSource:
    """Where the data came from, in words a log reader cannot misread."""

    name: str  # "fashion-mnist" or "digits"
    origin: str  # the URL, or "sklearn.datasets.load_digits"
    classes: list[str]
    offline: bool
    note: str


@dataclass
class Splits:
    """uint8 images (N, 28, 28) and int64 labels, in three disjoint splits."""

    x_train: Images
    y_train: Labels
    x_val: Images
    y_val: Labels
    x_test: Images
    y_test: Labels
    source: DataSource
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}


# ---- reading -------------------------------------------------------------------------------


def read_url(url: str, *, timeout: float = 30.0, s3_endpoint_url: str | None = None) -> bytes:
    """The bytes at `https://`, `http://`, `file://` or `s3://` (S3 credentials from the AWS variables)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).read_bytes()
    if parts.scheme == "s3":
        from cloudhpc.storage import open_object_store

        store = open_object_store(f"s3://{parts.netloc}", endpoint_url=s3_endpoint_url)
        return store.get(parts.path.lstrip("/"))
    if parts.scheme in ("http", "https"):
        import httpx

        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
        return response.content
    raise ValueError(f"{url!r}: the data URL must start with https://, http://, file:// or s3://")


def parse_idx(data: bytes) -> npt.NDArray[np.uint8]:
    """An IDX file (the MNIST family's format), gzipped or not, as a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"IDX element type 0x{data[2]:02x} is not unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if body.size != expected:
        raise ValueError(f"IDX body holds {body.size} bytes, the header promises {expected}")
    return body.reshape(shape)


def fetch_fmnist(base_url: str, *, s3_endpoint_url: str | None = None) -> dict[str, npt.NDArray[Any]]:
    """The four Fashion-MNIST arrays from `<base_url>/<published file name>`."""
    base = base_url.rstrip("/")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for key, name in FMNIST_FILES.items():
        raw = parse_idx(read_url(f"{base}/{name}", s3_endpoint_url=s3_endpoint_url))
        arrays[key] = raw if key.startswith("x_") else raw.astype(np.int64)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(x) != len(y):
            raise ValueError(
                f"{split} split has images {x.shape} and labels {y.shape}; expected (N, 28, 28) and (N,)"
            )
    return arrays


def digits_dataset() -> tuple[Images, Labels]:
    """scikit-learn's bundled digits (1,797 8x8 images, 0..16), as 28x28 uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    # Nearest-neighbour upsampling by 3 (24x24) and a 2-pixel border: the same 28x28 input as
    # Fashion-MNIST, so one network and one preprocessing serve both data sets.
    big = np.kron(images, np.ones((3, 3), dtype=np.float32))
    padded = np.pad(big, ((0, 0), (2, 2), (2, 2)))
    return (padded * 255.0).round().astype(np.uint8), digits.target.astype(np.int64)


# ---- splitting -----------------------------------------------------------------------------


def _stratified_take(
    labels: Labels, fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices of a class-balanced `fraction` of `labels`, and of the rest."""
    taken: list[npt.NDArray[np.int64]] = []
    rest: list[npt.NDArray[np.int64]] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = round(len(idx) * fraction)
        taken.append(idx[:n])
        rest.append(idx[n:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def _subsample(labels: Labels, limit: int | None, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    kept, _ = _stratified_take(labels, limit / len(labels), rng)
    return kept


def split_dataset(
    *,
    x_train: Images,
    y_train: Labels,
    x_test: Images | None,
    y_test: Labels | None,
    source: DataSource,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    seed: int = 42,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Splits:
    """Disjoint train/validation/test splits, stratified by class and seeded.

    With a published test split (`x_test`), it stays the test split and validation comes out of the
    training split; without one (digits), the test split is carved out first, then validation.
    `train_limit`/`test_limit` take a stratified subset, to keep a demo run short.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError("val_fraction and test_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    if x_test is None or y_test is None:
        test_idx, rest_idx = _stratified_take(y_train, test_fraction, rng)
        x_test, y_test = x_train[test_idx], y_train[test_idx]
        x_train, y_train = x_train[rest_idx], y_train[rest_idx]
    keep = _subsample(y_train, train_limit, rng)
    x_train, y_train = x_train[keep], y_train[keep]
    keep = _subsample(y_test, test_limit, rng)
    x_test, y_test = x_test[keep], y_test[keep]
    val_idx, train_idx = _stratified_take(y_train, val_fraction, rng)
    return Splits(
        x_train=x_train[train_idx],
        y_train=y_train[train_idx],
        x_val=x_train[val_idx],
        y_val=y_train[val_idx],
        x_test=x_test,
        y_test=y_test,
        source=source,
    )


def load_dataset(
    data_url: str | None,
    *,
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
    train_limit: int | None = None,
    test_limit: int | None = None,
    s3_endpoint_url: str | None = None,
) -> Splits:
    """Fashion-MNIST from `data_url`, or the digits when it is empty or cannot be read."""
    split_args: dict[str, Any] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "train_limit": train_limit,
        "test_limit": test_limit,
    }
    reason = "no data URL was configured"
    if data_url:
        try:
            arrays = fetch_fmnist(data_url, s3_endpoint_url=s3_endpoint_url)
        except Exception as exc:  # any failure to read means: offline
            reason = f"Fashion-MNIST could not be read from {data_url} ({type(exc).__name__}: {exc})"
        else:
            source = DataSource(
                name="fashion-mnist",
                origin=data_url,
                classes=FMNIST_CLASSES,
                offline=False,
                note=f"Fashion-MNIST from {data_url}",
            )
            return split_dataset(
                x_train=arrays["x_train"],
                y_train=arrays["y_train"],
                x_test=arrays["x_test"],
                y_test=arrays["y_test"],
                source=source,
                **split_args,
            )
    x, y = digits_dataset()
    source = DataSource(
        name="digits",
        origin="sklearn.datasets.load_digits",
        classes=DIGITS_CLASSES,
        offline=True,
        note=(
            f"OFFLINE: {reason}, so this run uses scikit-learn's bundled digits data set "
            "(1,797 8x8 images of the digits 0-9, upsampled to 28x28) instead of Fashion-MNIST; "
            "its accuracy is not a Fashion-MNIST accuracy"
        ),
    )
    return split_dataset(x_train=x, y_train=y, x_test=None, y_test=None, source=source, **split_args)


# ---- storing -------------------------------------------------------------------------------


def _npz(**arrays: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def write_splits(splits: Splits, directory: Path) -> dict[str, Path]:
    """`train.npz` (train + validation), `test.npz` (held-out test) and `meta.json` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    train = _npz(x_train=splits.x_train, y_train=splits.y_train, x_val=splits.x_val, y_val=splits.y_val)
    test = _npz(x_test=splits.x_test, y_test=splits.y_test)
    meta = {
        "source": asdict(splits.source),
        "counts": splits.counts,
        "image_shape": [1, IMAGE_SIDE, IMAGE_SIDE],
        "normalisation": {"mean": 0.5, "std": 0.5},
        "sha256": {
            "train.npz": hashlib.sha256(train).hexdigest(),
            "test.npz": hashlib.sha256(test).hexdigest(),
        },
    }
    paths = {
        "train": directory / "train.npz",
        "test": directory / "test.npz",
        "meta": directory / "meta.json",
    }
    paths["train"].write_bytes(train)
    paths["test"].write_bytes(test)
    paths["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def load_train_splits(path: str | Path) -> dict[str, npt.NDArray[Any]]:
    """x_train, y_train, x_val, y_val from a `train.npz`; refuses a file holding a test split."""
    with np.load(path) as data:
        if "x_test" in data.files:
            raise ValueError(f"{path} holds a test split; training must never see it")
        return {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val")}


def load_test_split(path: str | Path) -> tuple[Images, Labels]:
    with np.load(path) as data:
        return data["x_test"], data["y_test"]
