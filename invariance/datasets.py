"""MNIST and Fashion-MNIST: IDX reading, data location, opt-in download, fixed splits.

Files
-----
Both data sets are read from the publishers' IDX files (gzip-compressed or raw; the
compression is detected from the file's magic bytes, not its name)::

    <base>/mnist/t10k-images-idx3-ubyte.gz          <base>/fashion-mnist/...
    <base>/mnist/t10k-labels-idx1-ubyte.gz
    <base>/mnist/train-images-idx3-ubyte.gz         (optional)
    <base>/mnist/train-labels-idx1-ubyte.gz         (optional)

Uncompressed names (without ``.gz``) are accepted as well; when both exist the ``.gz``
file is used.

Where the data is looked for
----------------------------
:func:`find_dataset_dir` tries these bases in order and uses the first ``<base>/<name>``
folder that holds the files needed:

1. the ``root=`` argument, when given: then **only** there (an explicit folder that lacks the
   files is an error, never a silent fall-back to another copy);
2. the environment variable ``INVARIANCE_DATA``;
3. the user cache: ``$XDG_CACHE_HOME/invariance``, or ``~/.cache/invariance``;
4. the system folder ``/usr/share/datasets`` (where Debian's ``dataset-fashion-mnist``
   installs Fashion-MNIST).

Nothing is ever downloaded unless ``download=True`` is passed; downloads go to ``root``,
else ``$INVARIANCE_DATA``, else the user cache, and every file is checked against its
published md5 before it is moved into place.

Split protocols
---------------
:func:`load_dataset` returns the official files as they are. :func:`load_split` returns a
:class:`DataSplit` whose ``protocol`` string says which protocol was used:

* ``"official 60000/10000"``: the official training and test files both exist (always the
  case for Fashion-MNIST here, and for MNIST when a user has the full data set);
* ``"mnist-10k stratified 8000/2000 (seed 0)"``: only the official *test* file exists (as
  for MNIST on the project's machines, see ``/work/shared/data/README.md``). The 10,000
  test images are then split, once and reproducibly, into 8,000 training and 2,000 test
  images by :func:`stratified_split` (per class proportional, seeded). Split ``"train"``
  returns the 8,000 and split ``"test"`` the 2,000; the two never overlap. For a test file
  of another size N the split is N - N//5 / N//5.

Results obtained under the two protocols are not comparable with each other; report the
``protocol`` string next to every number.

Example
-------
>>> from invariance.datasets import load_split
>>> train = load_split("mnist", "train")                    # doctest: +SKIP
>>> train.images.shape, train.labels.dtype, train.protocol  # doctest: +SKIP
(torch.Size([8000, 28, 28]), torch.int64, 'mnist-10k stratified 8000/2000 (seed 0)')
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .files import user_cache_dir

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataSplit",
    "DatasetNotFoundError",
    "DownloadError",
    "IDXFormatError",
    "download_dataset",
    "find_dataset_dir",
    "load_dataset",
    "load_split",
    "read_idx",
    "stratified_split",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
SPLITS: tuple[str, ...] = ("train", "test")

#: Environment variable naming a base folder that holds ``mnist/`` and ``fashion-mnist/``.
ENV_VAR = "INVARIANCE_DATA"
#: System-wide base folder, searched last.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")

#: (images, labels) file names per split, without the ``.gz`` suffix.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Download mirrors, tried in order.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

#: Published md5 checksums of the gzip files.
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83fd310",
    },
}

IMAGE_SHAPE: tuple[int, int] = (28, 28)
NUM_CLASSES = 10

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_NDIM = 4
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- errors


class IDXFormatError(ValueError):
    """A data file is not a valid IDX file (or does not hold what the loader expects).

    The message is one line, ``"<path>: <problem>"``; ``path`` and ``problem`` are also
    available as attributes.

    Example
    -------
    >>> str(IDXFormatError("t10k-labels-idx1-ubyte.gz", "unknown dtype code 0x07"))
    't10k-labels-idx1-ubyte.gz: unknown dtype code 0x07'
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DatasetNotFoundError(FileNotFoundError):
    """The data set files were not found in any of the searched places.

    The message lists every place looked at and how to fix the problem; ``searched``
    holds the candidate folders in search order.

    Example
    -------
    >>> err = DatasetNotFoundError("mnist test files not found", searched=[])
    >>> isinstance(err, FileNotFoundError)
    True
    """

    def __init__(self, message: str, searched: list[Path]) -> None:
        self.searched = list(searched)
        super().__init__(message)


class DownloadError(OSError):
    """A file could not be downloaded from any mirror, or failed its checksum.

    Example
    -------
    >>> isinstance(DownloadError("no mirror answered"), OSError)
    True
    """


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) into a native-endian numpy array.

    Compression is detected from the gzip magic bytes ``1f 8b``, not from the file name.
    The header is validated strictly: two zero bytes, a known type code (``0x08`` ubyte,
    ``0x09`` sbyte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64,
    all big-endian), 1 to 4 dimensions, every dimension > 0, and a payload of exactly
    ``prod(dims) * itemsize`` bytes (truncated files and trailing bytes are both errors).

    Returns a fresh, writable, C-contiguous array in native byte order with the dims from
    the header as its shape.

    Raises
    ------
    IDXFormatError
        On any violation (including a corrupt gzip stream), with a one-line message
        ``"<path>: <problem>"``.
    FileNotFoundError
        If the file does not exist.

    Example
    -------
    >>> labels = read_idx("/work/shared/data/mnist/t10k-labels-idx1-ubyte.gz")  # doctest: +SKIP
    >>> labels.shape, labels.dtype                                            # doctest: +SKIP
    ((10000,), dtype('uint8'))
    """
    path = Path(path)
    raw = path.read_bytes()
    compressed = raw[:2] == _GZIP_MAGIC
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            reason = str(exc).strip() or type(exc).__name__
            raise IDXFormatError(path, f"corrupt gzip stream ({reason})") from None
    if len(raw) < 4:
        raise IDXFormatError(path, f"truncated header: expected at least 4 bytes, found {len(raw)}")
    if raw[0] != 0 or raw[1] != 0:
        gz = (
            "not gzip-compressed although its name ends in .gz (no 1f 8b magic bytes), and not an IDX file either: "
            if path.suffix == ".gz" and not compressed
            else "not an IDX file: "
        )
        raise IDXFormatError(
            path,
            f"{gz}bad magic number 0x{raw[:4].hex()} (an IDX file starts with two zero bytes)",
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXFormatError(path, f"unknown dtype code 0x{code:02X} (valid: {known})")
    if not 1 <= ndim <= _MAX_NDIM:
        raise IDXFormatError(path, f"unsupported number of dimensions {ndim} (valid: 1 to {_MAX_NDIM})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(
            path,
            f"truncated header: expected {header_len} bytes for {ndim} dimensions, found {len(raw)}",
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise IDXFormatError(path, f"zero-sized dimension in shape {dims}")
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found < expected:
        raise IDXFormatError(path, f"truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise IDXFormatError(
            path,
            f"{found - expected} trailing bytes: expected {expected} bytes of data, found {found}",
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), order="C", copy=True)


# --------------------------------------------------------------------------- location


def _check_choice(argument: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {argument} {value!r}; valid choices: {valid}")


def _candidate_bases(root: str | os.PathLike[str] | None) -> list[tuple[Path | None, str]]:
    """(base folder or None when unset, description) in search order."""
    bases: list[tuple[Path | None, str]] = []
    if root is not None:  # an explicit folder is the only place looked at
        return [(Path(root).expanduser(), "root argument")]
    env = os.environ.get(ENV_VAR, "")
    bases.append((Path(env).expanduser() if env else None, f"${ENV_VAR}"))
    bases.append((user_cache_dir(), "user cache"))
    bases.append((Path(SYSTEM_DATA_DIR), "system data"))
    return bases


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _split_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    images, labels = (_find_file(folder, stem) for stem in SPLIT_FILES[split])
    if images is None or labels is None:
        return None
    return images, labels


def _search(name: str, root: str | os.PathLike[str] | None, splits: tuple[str, ...]) -> Path:
    """First folder holding the files of any of ``splits``; else raise with a report."""
    searched: list[Path] = []
    report: list[str] = []
    for base, what in _candidate_bases(root):
        if base is None:
            report.append(f"{what} (not set)")
            continue
        folder = base / name
        searched.append(folder)
        if not folder.is_dir():
            report.append(f"{folder} ({what}: no such folder)")
            continue
        if any(_split_files(folder, s) is not None for s in splits):
            return folder
        wanted = " or ".join(f"{SPLIT_FILES[s][0]}[.gz] + {SPLIT_FILES[s][1]}[.gz]" for s in splits)
        report.append(f"{folder} ({what}: lacks {wanted})")
    what_missing = f"{name} {splits[0]} files" if len(splits) == 1 else f"{name} data"
    if root is not None:
        fix = f"pass a root folder that contains '{name}/' with the IDX files, or pass download=True to fetch them"
    else:
        fix = (f"set {ENV_VAR} to a folder containing '{name}/' with the IDX files, "
               f"pass root=<that folder>, or pass download=True to fetch them")
    message = f"{what_missing} not found; looked in: {'; '.join(report)}. To fix: {fix}."
    raise DatasetNotFoundError(message, searched)


def find_dataset_dir(
    name: str, root: str | os.PathLike[str] | None = None, *, split: str | None = None
) -> Path:
    """Return the folder ``<base>/<name>`` holding the IDX files of data set ``name``.

    With ``root`` only ``root`` is searched; without it, in this order: ``$INVARIANCE_DATA``,
    ``$XDG_CACHE_HOME/invariance`` (or ``~/.cache/invariance``), ``/usr/share/datasets``.
    A folder qualifies when it holds both the images and the labels file (``.gz`` or
    raw) of ``split``, or of either split when ``split`` is None.

    Raises
    ------
    ValueError
        Unknown ``name`` or ``split``.
    DatasetNotFoundError
        Nothing found; the one-line message lists every place looked at and how to fix it.

    Example
    -------
    >>> find_dataset_dir("mnist", root="/work/shared/data")  # doctest: +SKIP
    PosixPath('/work/shared/data/mnist')
    >>> find_dataset_dir("fashion-mnist", split="train")     # doctest: +SKIP
    PosixPath('/usr/share/datasets/fashion-mnist')
    """
    _check_choice("dataset name", name, DATASETS)
    if split is not None:
        _check_choice("split", split, SPLITS)
    splits = SPLITS if split is None else (split,)
    return _search(name, root, splits)


# --------------------------------------------------------------------------- download


def _fetch(url: str, dest: BinaryIO, timeout: float = 60.0) -> None:
    """Stream ``url`` into the open binary file ``dest`` (replaced by fakes in tests)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        shutil.copyfileobj(response, dest, length=1 << 20)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_file(name: str, filename: str, folder: Path) -> Path:
    expected = MD5[name][filename]
    target = folder / filename
    failures: list[str] = []
    for mirror in MIRRORS[name]:
        url = mirror + filename
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                _fetch(url, fh)
            actual = _md5(tmp)
            if actual != expected:
                failures.append(f"{url}: md5 mismatch (expected {expected}, got {actual})")
                continue
            os.replace(tmp, target)
            return target
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(f"could not download {filename} for {name}: {'; '.join(failures)}")


def download_dataset(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Download the four IDX files of ``name`` into ``<base>/<name>`` and return that folder.

    ``base`` is ``root`` if given, else ``$INVARIANCE_DATA`` if set, else the user cache
    (``$XDG_CACHE_HOME/invariance`` or ``~/.cache/invariance``). Mirrors are tried in
    order (MNIST: ossci-datasets S3, then yann.lecun.com; Fashion-MNIST: Zalando's S3).
    Each file is streamed to a temporary file in the target folder, checked against its
    published md5 and only then moved into place with :func:`os.replace`, so a failed or
    corrupt download never leaves a partial file under the final name. Files already
    present (``.gz`` or raw) are not downloaded again.

    This is the only function that touches the network; loaders call it only when the
    user passes ``download=True``.

    Raises
    ------
    DownloadError
        A file could not be fetched from any mirror or failed its checksum everywhere.

    Example
    -------
    >>> download_dataset("mnist", root="~/data")  # doctest: +SKIP
    PosixPath('/home/me/data/mnist')
    """
    _check_choice("dataset name", name, DATASETS)
    if root is not None:
        base = Path(root).expanduser()
    elif os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR]).expanduser()
    else:
        base = user_cache_dir()
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    for stems in SPLIT_FILES.values():
        for stem in stems:
            if _find_file(folder, stem) is None:
                _download_file(name, f"{stem}.gz", folder)
    return folder


# --------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def _load_arrays(
    images_path: str, labels_path: str, _stamp: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise IDXFormatError(
            images_path,
            f"expected ubyte images of shape (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}), "
            f"found {images.dtype} array of shape {images.shape}",
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(
            labels_path,
            f"expected ubyte labels of shape (N,), found {labels.dtype} array of shape {labels.shape}",
        )
    if len(images) != len(labels):
        raise IDXFormatError(
            images_path,
            f"holds {len(images)} images but {labels_path} holds {len(labels)} labels",
        )
    if labels.max() >= NUM_CLASSES:
        raise IDXFormatError(labels_path, f"label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    si, sl = images_path.stat(), labels_path.stat()
    stamp = (si.st_mtime_ns, si.st_size, sl.st_mtime_ns, sl.st_size)
    return _load_arrays(str(images_path), str(labels_path), stamp)


def _locate_split(
    name: str, split: str, root: str | os.PathLike[str] | None, download: bool
) -> tuple[Path, Path]:
    try:
        folder = find_dataset_dir(name, root, split=split)
    except DatasetNotFoundError:
        if not download:
            raise
        folder = download_dataset(name, root)
    files = _split_files(folder, split)
    if files is None:  # pragma: no cover - download_dataset fetches every split
        raise DatasetNotFoundError(f"{name} {split} files missing in {folder}", [folder])
    return files


def load_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an official split: images as uint8 ``(N, 28, 28)``, labels as int64 ``(N,)``.

    ``name`` is one of :data:`DATASETS`, ``split`` one of ``("train", "test")``. Files are
    located with :func:`find_dataset_dir`; with ``download=True`` missing files are fetched
    by :func:`download_dataset`. Parsed files are cached in-process (keyed on path, size
    and modification time); every call returns fresh tensors the caller may modify.

    Raises
    ------
    ValueError
        Unknown ``name`` or ``split`` (the message lists the valid choices).
    DatasetNotFoundError
        The split's files are not found and ``download`` is False.
    IDXFormatError
        A file is malformed, or images and labels disagree (the message names both).

    Example
    -------
    >>> images, labels = load_dataset("fashion-mnist", "train")  # doctest: +SKIP
    >>> images.shape, images.dtype, labels.shape, labels.dtype   # doctest: +SKIP
    (torch.Size([60000, 28, 28]), torch.uint8, torch.Size([60000]), torch.int64)
    """
    _check_choice("dataset name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    images_path, labels_path = _locate_split(name, split, root, download)
    images, labels = _read_pair(images_path, labels_path)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- splits


def _largest_remainder(total: int, counts: np.ndarray, capacity: np.ndarray | None = None) -> np.ndarray:
    """Integers within 1 of ``total * counts / counts.sum()`` summing to ``total``.

    Remainders are handed out largest first (ties to the lower class index), never above
    ``capacity``. Exact integer arithmetic throughout.
    """
    n = int(counts.sum())
    numer = total * counts
    alloc = numer // n
    remainder = numer - alloc * n
    if capacity is not None:
        alloc = np.minimum(alloc, capacity)
    left = total - int(alloc.sum())
    for c in np.argsort(-remainder, kind="stable"):
        if left == 0:
            break
        if remainder[c] > 0 and (capacity is None or alloc[c] < capacity[c]):
            alloc[c] += 1
            left -= 1
    if left != 0:  # pragma: no cover - cannot happen for capacity = counts - LR allocation
        raise RuntimeError("stratified allocation failed; please report this as a bug")
    return alloc


def stratified_split(
    labels: np.ndarray | torch.Tensor | list[int],
    n_train: int = 8000,
    n_test: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified, seeded split of ``range(len(labels))`` into train / test indices.

    Each class c with n_c members gets ``n_test * n_c / N`` test and ``n_train * n_c / N``
    training indices, rounded by the largest-remainder method, so the totals are exactly
    ``n_test`` and ``n_train`` and each per-class count is within 1 of its exact
    proportional share. Members of each class are drawn by a permutation from
    ``numpy.random.default_rng(seed)``; the same labels and seed always give the same
    split. When ``n_train + n_test < N`` the remaining indices are left out.

    Returns two disjoint, sorted int64 index arrays ``(train_idx, test_idx)``.

    Raises
    ------
    ValueError
        ``labels`` is not 1-D integer, or the sizes are negative or exceed ``len(labels)``.

    Example
    -------
    >>> labels = np.repeat(np.arange(10), 1000)
    >>> train_idx, test_idx = stratified_split(labels, n_train=8000, n_test=2000, seed=0)
    >>> len(train_idx), len(test_idx), np.bincount(labels[test_idx]).tolist()
    (8000, 2000, [200, 200, 200, 200, 200, 200, 200, 200, 200, 200])
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    n = len(y)
    if n_train < 0 or n_test < 0 or n_train + n_test > n:
        raise ValueError(
            f"need 0 <= n_train, n_test and n_train + n_test <= len(labels) = {n}; "
            f"got n_train={n_train}, n_test={n_test}"
        )
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    counts = counts.astype(np.int64)
    test_counts = _largest_remainder(n_test, counts)
    train_counts = _largest_remainder(n_train, counts, capacity=counts - test_counts)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == c))
        test_parts.append(members[: test_counts[c]])
        train_parts.append(members[test_counts[c] : test_counts[c] + train_counts[c]])
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    return train_idx, test_idx


@dataclass(frozen=True, eq=False)
class DataSplit:
    """Images, labels and the protocol that produced them (see the module docstring).

    Attributes
    ----------
    images : uint8 tensor ``(N, 28, 28)``
    labels : int64 tensor ``(N,)``
    protocol : e.g. ``"official 60000/10000"`` or ``"mnist-10k stratified 8000/2000 (seed 0)"``
    indices : for a stratified split, the indices into the official test file; else None.

    Example
    -------
    >>> s = DataSplit(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), "toy")
    >>> len(s), s.protocol
    (2, 'toy')
    """

    images: torch.Tensor
    labels: torch.Tensor
    protocol: str
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _size_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def load_split(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
) -> DataSplit:
    """Load the train or test split under the best protocol the available files allow.

    * If the official training files are found (or ``download=True`` fetches them), the
      official split is returned, with protocol ``"official <N_train>/<N_test>"``.
    * Otherwise, if only the official test files are found (MNIST on the project's
      machines), the test set is split by :func:`stratified_split` into
      ``N - N//5`` training and ``N//5`` test images (8000/2000 for the 10,000 MNIST test
      digits) with the given ``seed``; protocol e.g.
      ``"mnist-10k stratified 8000/2000 (seed 0)"``, and ``indices`` holds the chosen
      positions in the test file.

    Raises
    ------
    ValueError
        Unknown ``name`` or ``split``.
    DatasetNotFoundError
        Neither training nor test files are found and ``download`` is False.

    Example
    -------
    >>> train = load_split("mnist", "train")   # doctest: +SKIP
    >>> len(train), train.protocol            # doctest: +SKIP
    (8000, 'mnist-10k stratified 8000/2000 (seed 0)')
    >>> load_split("fashion-mnist", "test").protocol  # doctest: +SKIP
    'official 60000/10000'
    """
    _check_choice("dataset name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    try:
        official = _locate_split(name, "train", root, download)
    except DatasetNotFoundError:
        official = None
    if official is not None:
        test_files = _locate_split(name, "test", root, download)
        n_train = len(read_idx(official[1]))
        n_test = len(read_idx(test_files[1]))
        images, labels = load_dataset(name, split, root)
        return DataSplit(images, labels, f"official {n_train}/{n_test}")

    images, labels = load_dataset(name, "test", root)
    n = len(labels)
    n_test = n // 5
    n_train = n - n_test
    train_idx, test_idx = stratified_split(labels, n_train=n_train, n_test=n_test, seed=seed)
    idx = train_idx if split == "train" else test_idx
    protocol = f"{name}-{_size_tag(n)} stratified {n_train}/{n_test} (seed {seed})"
    chosen = torch.from_numpy(idx)
    return DataSplit(images[chosen], labels[chosen], protocol, indices=idx)
