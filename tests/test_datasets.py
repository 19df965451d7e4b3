"""Tests for invariance.datasets: IDX parsing, data location, download logic, splits."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from invariance import datasets
from invariance.datasets import (
    DATASETS,
    DatasetNotFoundError,
    DataSplit,
    DownloadError,
    IDXFormatError,
    download_dataset,
    find_dataset_dir,
    load_dataset,
    load_split,
    read_idx,
    stratified_split,
)

# IDX type codes, written independently of the module under test.
CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file (big-endian), independently of the reader."""
    code = CODES[array.dtype.kind + str(array.dtype.itemsize)]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_split(
    folder: Path, stem_images: str, stem_labels: str, labels: np.ndarray, compress: bool = True
) -> None:
    """Write a small valid images/labels pair (28x28 uint8 images)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = (np.arange(len(labels) * 28 * 28) % 251).astype(np.uint8).reshape(-1, 28, 28)
    suffix = ".gz" if compress else ""
    write(folder / f"{stem_images}{suffix}", idx_bytes(images), compress)
    write(folder / f"{stem_labels}{suffix}", idx_bytes(labels.astype(np.uint8)), compress)


def write_test_split(folder: Path, labels: np.ndarray | None = None, **kw: bool) -> None:
    labels = np.arange(50) % 10 if labels is None else labels
    write_split(folder, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", labels, **kw)


def write_train_split(folder: Path, labels: np.ndarray | None = None, **kw: bool) -> None:
    labels = np.arange(60) % 10 if labels is None else labels
    write_split(folder, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", labels, **kw)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point every search location at its own empty folder under tmp_path."""
    places = {
        "root": tmp_path / "root",
        "env": tmp_path / "env",
        "xdg": tmp_path / "xdg",
        "home": tmp_path / "home",
        "system": tmp_path / "system",
    }
    for p in places.values():
        p.mkdir()
    monkeypatch.setenv("INVARIANCE_DATA", str(places["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(places["xdg"]))
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", places["system"])
    datasets._load_arrays.cache_clear()
    return places


# --------------------------------------------------------------------------- read_idx

DTYPES = [np.dtype(t) for t in ("u1", "i1", ">i2", ">i4", ">f4", ">f8")]


@settings(max_examples=60, deadline=None)
@given(
    array=st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    ),
    compress=st.booleans(),
)
def test_read_idx_roundtrip(array: np.ndarray, compress: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        # The name never says .gz: compression is detected from the magic bytes.
        path = write(Path(d) / "data-idx", idx_bytes(array), compress)
        out = read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype.newbyteorder("=")
    assert out.dtype.isnative
    assert out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_known_bytes(tmp_path: Path, compress: bool) -> None:
    # 2x3 int16 array, header and payload written by hand.
    payload = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + struct.pack(">6h", -1, 2, -300, 4, 5, 32767)
    out = read_idx(write(tmp_path / "x.gz", payload, compress))  # misleading name on purpose
    np.testing.assert_array_equal(out, [[-1, 2, -300], [4, 5, 32767]])
    assert out.dtype == np.int16


def _good() -> bytes:
    return idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


CORRUPT = {
    "bad magic": (b"\x01\x00" + _good()[2:], "magic"),
    "bad dtype code": (_good()[:2] + b"\x07" + _good()[3:], "dtype code 0x07"),
    "zero ndim": (b"\x00\x00\x08\x00", "dimensions"),
    "too many dims": (b"\x00\x00\x08\x05" + b"\x00\x00\x00\x01" * 5 + b"\x00", "dimensions"),
    "short header": (_good()[:9], "truncated header"),
    "truncated": (_good()[:-5], "truncated: expected 24 bytes of data, found 19"),
    "trailing bytes": (_good() + b"\x00\x01", "2 trailing bytes"),
    "zero dim": (b"\x00\x00\x08\x02\x00\x00\x00\x03\x00\x00\x00\x00", "zero-sized"),
    "empty": (b"", "truncated header"),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_read_idx_rejects_corrupt(tmp_path: Path, case: str, compress: bool) -> None:
    payload, fragment = CORRUPT[case]
    path = write(tmp_path / f"bad-{case.replace(' ', '_')}-idx3-ubyte", payload, compress)
    with pytest.raises(IDXFormatError) as info:
        read_idx(path)
    message = str(info.value)
    assert path.name in message
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: gz[: len(gz) // 2],  # truncated stream
        lambda gz: gz[:20] + bytes(b ^ 0xFF for b in gz[20:-8]) + gz[-8:],  # garbled
        lambda gz: gz[:-8] + bytes(8),  # bad CRC / length trailer
        lambda gz: gz[:3],  # header only
    ],
    ids=["truncated", "garbled", "bad-crc", "header-only"],
)
def test_read_idx_corrupt_gzip(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    gz = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(damage(gz))
    with pytest.raises(IDXFormatError, match="t10k-labels-idx1-ubyte.gz") as info:
        read_idx(path)
    assert "\n" not in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------- location


def test_find_order(isolated: dict[str, Path]) -> None:
    # Fill from the last place to the first, checking each time the first hit wins.
    write_test_split(isolated["system"] / "mnist")
    assert find_dataset_dir("mnist") == isolated["system"] / "mnist"
    write_test_split(isolated["home"] / ".cache" / "invariance" / "mnist", compress=False)
    # XDG_CACHE_HOME is set, so ~/.cache is not the cache dir.
    assert find_dataset_dir("mnist") == isolated["system"] / "mnist"
    write_test_split(isolated["xdg"] / "invariance" / "mnist")
    assert find_dataset_dir("mnist") == isolated["xdg"] / "invariance" / "mnist"
    write_test_split(isolated["env"] / "mnist")
    assert find_dataset_dir("mnist") == isolated["env"] / "mnist"
    write_test_split(isolated["root"] / "mnist")
    assert find_dataset_dir("mnist", root=isolated["root"]) == isolated["root"] / "mnist"
    assert find_dataset_dir("mnist", root=str(isolated["root"])) == isolated["root"] / "mnist"


def test_find_home_cache_when_xdg_unset(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("INVARIANCE_DATA")
    write_test_split(isolated["home"] / ".cache" / "invariance" / "fashion-mnist", compress=False)
    found = find_dataset_dir("fashion-mnist")
    assert found == isolated["home"] / ".cache" / "invariance" / "fashion-mnist"
    images, labels = load_dataset("fashion-mnist", "test")  # raw (uncompressed) files
    assert images.shape == (50, 28, 28)


def test_find_skips_incomplete_folders(isolated: dict[str, Path]) -> None:
    write_test_split(isolated["env"] / "mnist")
    (isolated["xdg"] / "invariance" / "mnist").mkdir(parents=True)  # exists but empty: keep searching
    write_test_split(isolated["system"] / "mnist")
    (isolated["env"] / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")  # no labels
    assert find_dataset_dir("mnist") == isolated["env"] / "mnist"
    # The env folder only has test files: asking for train looks further, and fails.
    with pytest.raises(DatasetNotFoundError, match="mnist train files not found"):
        find_dataset_dir("mnist", split="train")
    write_train_split(isolated["xdg"] / "invariance" / "mnist")
    assert find_dataset_dir("mnist", split="train") == isolated["xdg"] / "invariance" / "mnist"


def test_an_explicit_root_is_the_only_place_looked_at(isolated: dict[str, Path]) -> None:
    """``root=`` (``--data-root``) that lacks the files is an error naming it, never a silent
    fall-back to the copy under INVARIANCE_DATA (results would record the wrong data path)."""
    write_test_split(isolated["env"] / "mnist")
    write_train_split(isolated["env"] / "mnist")
    (isolated["root"] / "mnist").mkdir()
    (isolated["root"] / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")  # no labels
    for split in ("test", "train"):
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset("mnist", split, root=isolated["root"])
        assert info.value.searched == [isolated["root"] / "mnist"]
        assert str(isolated["env"]) not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="no such folder"):
        find_dataset_dir("mnist", root=isolated["root"] / "nowhere")


def test_not_found_message_lists_every_place(isolated: dict[str, Path]) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "test")
    err = info.value
    message = str(err)
    assert isinstance(err, FileNotFoundError)
    for place in (
        isolated["env"] / "mnist",
        isolated["xdg"] / "invariance" / "mnist",
        isolated["system"] / "mnist",
    ):
        assert str(place) in message
    assert err.searched == [
        isolated["env"] / "mnist",
        isolated["xdg"] / "invariance" / "mnist",
        isolated["system"] / "mnist",
    ]
    assert "INVARIANCE_DATA" in message and "root=" in message and "download=True" in message
    assert "\n" not in message
    # The order of the message is the search order.
    positions = [message.index(str(p)) for p in err.searched]
    assert positions == sorted(positions)


def test_not_found_mentions_unset_env(isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVARIANCE_DATA")
    with pytest.raises(DatasetNotFoundError, match=r"\$INVARIANCE_DATA \(not set\)"):
        find_dataset_dir("fashion-mnist")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": "mnsit"}, "dataset name 'mnsit'"),
        ({"name": "mnist", "split": "val"}, "split 'val'"),
    ],
)
def test_unknown_name_or_split(kwargs: dict[str, str], argument: str) -> None:
    for fn in (load_dataset, load_split):
        with pytest.raises(ValueError, match=argument) as info:
            fn(**{"split": "test", **kwargs})
        message = str(info.value)
        assert "\n" not in message
        choices = ("'mnist'", "'fashion-mnist'") if "name" in argument else ("'train'", "'test'")
        assert all(c in message for c in choices)
    with pytest.raises(ValueError, match="dataset name"):
        find_dataset_dir("cifar")
    with pytest.raises(ValueError, match="dataset name"):
        download_dataset("cifar")


# --------------------------------------------------------------------------- loading


def test_load_dataset_types_and_fresh_tensors(isolated: dict[str, Path]) -> None:
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    write_test_split(isolated["env"] / "mnist", labels)
    images, got = load_dataset("mnist")
    assert images.dtype == torch.uint8 and images.shape == (8, 28, 28)
    assert got.dtype == torch.int64 and got.tolist() == labels.tolist()
    images[0] = 0  # callers may modify their copy without touching the cache
    got[0] = 7
    images2, got2 = load_dataset("mnist")
    assert images2[0].sum() > 0 and got2[0] == 3


def test_load_dataset_count_mismatch_names_both_files(isolated: dict[str, Path]) -> None:
    folder = isolated["env"] / "mnist"
    write_test_split(folder, np.arange(10) % 10)
    write(folder / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(9, np.uint8)), True)
    with pytest.raises(IDXFormatError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "10 images" in message and "9 labels" in message


def test_load_dataset_wrong_content(isolated: dict[str, Path]) -> None:
    folder = isolated["env"] / "mnist"
    write_test_split(folder)
    write(folder / "t10k-images-idx3-ubyte.gz", idx_bytes(np.zeros((50, 27, 28), np.uint8)), True)
    with pytest.raises(IDXFormatError, match=r"t10k-images-idx3-ubyte.gz: .*\(N, 28, 28\)"):
        load_dataset("mnist")
    write_test_split(folder, np.full(50, 10))
    with pytest.raises(IDXFormatError, match="t10k-labels-idx1-ubyte.gz: label 10"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- splits


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_properties(counts: list[int], data: st.DataObject, seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)) * 3 + 1, counts)  # non-contiguous class ids
    labels = np.random.default_rng(0).permutation(labels)
    n = len(labels)
    n_test = data.draw(st.integers(0, n), label="n_test")
    n_train = data.draw(st.integers(0, n - n_test), label="n_train")
    train, test = stratified_split(labels, n_train=n_train, n_test=n_test, seed=seed)
    assert len(train) == n_train and len(test) == n_test
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert len(np.intersect1d(train, test)) == 0
    assert len(np.unique(train)) == n_train and len(np.unique(test)) == n_test
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    for cls, count in zip(np.arange(len(counts)) * 3 + 1, counts):
        for idx, size in ((train, n_train), (test, n_test)):
            got = int(np.sum(labels[idx] == cls))
            assert abs(got - size * count / n) < 1
    again = stratified_split(labels, n_train=n_train, n_test=n_test, seed=seed)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], test)


def test_stratified_split_defaults_and_seeds() -> None:
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 10, size=10_000))
    train, test = stratified_split(labels)
    assert (len(train), len(test)) == (8000, 2000)
    assert len(np.union1d(train, test)) == 10_000
    other_train, other_test = stratified_split(labels, seed=1)
    assert not np.array_equal(train, other_train)
    assert not np.array_equal(test, other_test)
    # Same per-class counts, whatever the seed.
    assert np.array_equal(np.bincount(labels.numpy()[test]), np.bincount(labels.numpy()[other_test]))


def test_stratified_split_errors() -> None:
    with pytest.raises(ValueError, match="n_train"):
        stratified_split(np.zeros(10, int), n_train=8, n_test=3)
    with pytest.raises(ValueError, match="n_train"):
        stratified_split(np.zeros(10, int), n_train=-1, n_test=3)
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(np.zeros((2, 5), int), n_train=1, n_test=1)
    with pytest.raises(ValueError, match="integers"):
        stratified_split(np.zeros(10), n_train=1, n_test=1)
    train, test = stratified_split([], n_train=0, n_test=0)
    assert len(train) == len(test) == 0


def test_load_split_stratified_when_only_test(isolated: dict[str, Path]) -> None:
    labels = np.repeat(np.arange(10), [50, 60, 40, 50, 50, 50, 50, 50, 50, 50])
    write_test_split(isolated["env"] / "mnist", labels)
    train = load_split("mnist", "train")
    test = load_split("mnist", "test")
    assert isinstance(train, DataSplit)
    assert (len(train), len(test)) == (400, 100)
    assert train.protocol == test.protocol == "mnist-500 stratified 400/100 (seed 0)"
    assert train.indices is not None and test.indices is not None
    assert len(np.intersect1d(train.indices, test.indices)) == 0
    assert train.labels.tolist() == labels[train.indices].tolist()
    assert test.labels.dtype == torch.int64 and test.images.dtype == torch.uint8
    assert load_split("mnist", "test", seed=3).protocol.endswith("(seed 3)")


def test_load_split_official_when_train_exists(isolated: dict[str, Path]) -> None:
    write_test_split(isolated["env"] / "fashion-mnist")
    write_train_split(isolated["env"] / "fashion-mnist")
    train = load_split("fashion-mnist", "train")
    test = load_split("fashion-mnist", "test")
    assert (len(train), len(test)) == (60, 50)
    assert train.protocol == test.protocol == "official 60/50"
    assert train.indices is None


# --------------------------------------------------------------------------- download


class FakeServer:
    """Stands in for the network: url -> bytes, or an exception to raise."""

    def __init__(self, files: dict[str, bytes | Exception]) -> None:
        self.files = files
        self.requests: list[str] = []

    def __call__(self, url: str, dest: BinaryIO, timeout: float = 60.0) -> None:
        self.requests.append(url)
        content = self.files.get(url, OSError(f"404 for {url}"))
        if isinstance(content, Exception):
            dest.write(b"partial garbage")
            raise content
        dest.write(content)


def fake_payloads() -> dict[str, bytes]:
    """Small valid gz files under the four canonical names."""
    out = {}
    for split, (img, lab) in datasets.SPLIT_FILES.items():
        n = 6 if split == "train" else 4
        out[f"{img}.gz"] = gzip.compress(idx_bytes(np.full((n, 28, 28), 7, np.uint8)))
        out[f"{lab}.gz"] = gzip.compress(idx_bytes((np.arange(n) % 10).astype(np.uint8)))
    return out


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", refuse)


def test_download_verifies_and_installs(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    payloads = fake_payloads()
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()}
    monkeypatch.setitem(datasets.MD5, "mnist", md5)
    first, second = datasets.MIRRORS["mnist"]
    # First mirror is down for one file and serves a corrupt copy of another.
    files: dict[str, bytes | Exception] = {second + k: v for k, v in payloads.items()}
    files.update({first + k: v for k, v in payloads.items()})
    files[first + "train-images-idx3-ubyte.gz"] = OSError("connection reset")
    files[first + "t10k-labels-idx1-ubyte.gz"] = payloads["t10k-labels-idx1-ubyte.gz"][:-1]
    server = FakeServer(files)
    monkeypatch.setattr(datasets, "_fetch", server)

    folder = download_dataset("mnist", root=isolated["root"])
    assert folder == isolated["root"] / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(payloads)  # no temp files
    for name, content in payloads.items():
        assert (folder / name).read_bytes() == content
    assert second + "train-images-idx3-ubyte.gz" in server.requests
    assert second + "t10k-labels-idx1-ubyte.gz" in server.requests

    # Present files are not fetched again.
    server.requests.clear()
    download_dataset("mnist", root=isolated["root"])
    assert server.requests == []

    split = load_split("mnist", "train", root=isolated["root"])
    assert split.protocol == "official 6/4" and len(split) == 6


def test_download_checksum_mismatch_leaves_nothing(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    payloads = fake_payloads()  # real md5 table: these never match
    (mirror,) = datasets.MIRRORS["fashion-mnist"]
    server = FakeServer({mirror + k: v for k, v in payloads.items()})
    monkeypatch.setattr(datasets, "_fetch", server)
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        download_dataset("fashion-mnist")  # goes to $INVARIANCE_DATA
    assert isinstance(info.value, OSError)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    folder = isolated["env"] / "fashion-mnist"
    assert list(folder.iterdir()) == []  # no partial or temporary file


def test_download_all_mirrors_down(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    server = FakeServer({})
    monkeypatch.setattr(datasets, "_fetch", server)
    monkeypatch.delenv("INVARIANCE_DATA")
    with pytest.raises(DownloadError) as info:
        load_dataset("mnist", "test", download=True)  # goes to the user cache
    message = str(info.value)
    for mirror in datasets.MIRRORS["mnist"]:
        assert mirror in message
    assert len(server.requests) == 2
    assert list((isolated["xdg"] / "invariance" / "mnist").iterdir()) == []


def test_loaders_never_download_by_default(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    server = FakeServer({})
    monkeypatch.setattr(datasets, "_fetch", server)
    for name in DATASETS:
        with pytest.raises(DatasetNotFoundError):
            load_dataset(name, "train")
        with pytest.raises(DatasetNotFoundError):
            load_split(name, "test")
    assert server.requests == []


def test_load_dataset_download_true(
    isolated: dict[str, Path], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    payloads = fake_payloads()
    monkeypatch.setitem(
        datasets.MD5, "fashion-mnist", {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()}
    )
    (mirror,) = datasets.MIRRORS["fashion-mnist"]
    monkeypatch.setattr(datasets, "_fetch", FakeServer({mirror + k: v for k, v in payloads.items()}))
    images, labels = load_dataset("fashion-mnist", "train", download=True)
    assert images.shape == (6, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert (isolated["env"] / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()


# --------------------------------------------------------------------------- real data


def _real_base() -> Path:
    env = os.environ.get("INVARIANCE_DATA")
    if not env:
        pytest.skip("INVARIANCE_DATA is not set; real-data tests need MNIST/Fashion-MNIST")
    return Path(env)


@pytest.fixture
def real_mnist() -> Path:
    base = _real_base()
    if not (base / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test set not found under {base}/mnist")
    return base


@pytest.fixture
def real_fashion() -> Path:
    base = _real_base()
    folder = base / "fashion-mnist"
    if not all(_has(folder, s) for s in ("train", "t10k")):
        pytest.skip(f"Fashion-MNIST train and test files not found under {folder}")
    return base


def _has(folder: Path, prefix: str) -> bool:
    return any((folder / f"{prefix}-images-idx3-ubyte{s}").is_file() for s in (".gz", ""))


MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.data
def test_real_mnist_test_set(real_mnist: Path) -> None:
    images, labels = load_dataset("mnist", "test", root=real_mnist)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert int(images.max()) == 255 and int(images.min()) == 0


@pytest.mark.data
def test_real_mnist_files_match_published_md5(real_mnist: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        digest = hashlib.md5((real_mnist / "mnist" / name).read_bytes()).hexdigest()
        assert digest == datasets.MD5["mnist"][name]


@pytest.mark.data
def test_real_mnist_split(real_mnist: Path) -> None:
    if _has(real_mnist / "mnist", "train"):
        pytest.skip("the full MNIST training set is present: the official split is used")
    train = load_split("mnist", "train", root=real_mnist)
    test = load_split("mnist", "test", root=real_mnist)
    assert (len(train), len(test)) == (8000, 2000)
    assert "8000/2000" in train.protocol and train.protocol == test.protocol
    assert train.protocol == "mnist-10k stratified 8000/2000 (seed 0)"
    assert train.indices is not None and test.indices is not None
    assert len(np.intersect1d(train.indices, test.indices)) == 0
    for cls, count in enumerate(MNIST_TEST_COUNTS):
        assert abs(int((test.labels == cls).sum()) - count / 5) < 1
        assert abs(int((train.labels == cls).sum()) - count * 4 / 5) < 1


@pytest.mark.data
def test_real_fashion_mnist(real_fashion: Path) -> None:
    train = load_split("fashion-mnist", "train", root=real_fashion)
    test = load_split("fashion-mnist", "test", root=real_fashion)
    assert train.images.shape == (60_000, 28, 28)
    assert test.images.shape == (10_000, 28, 28)
    assert train.protocol == test.protocol == "official 60000/10000"
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
