"""The laws of :mod:`invariance.files` (atomic writes, manifests, the safe loader).

What tests/test_bad_inputs.py (killed writes, a failed first write, temporaries of live and dead
processes, ``--out`` checks through the CLI, a report folder mixing two saves) and
tests/test_loading_safety.py (pickle payloads refused, optimiser state read) already pin is not
repeated. Here:

* **a write is all or nothing**: whatever the writer has written when it fails (an exception, or
  Ctrl-C), the target keeps its old bytes (or stays absent) and no temporary file stays; when it
  succeeds, the target holds exactly the new bytes; a reader that opened the old file keeps
  reading the old bytes (the new file is renamed into place, never written in place);
* **a manifest detects a changed file**: :func:`describe_files` records size and sha256 (the
  known answer is :mod:`hashlib`'s), and :func:`check_files` refuses any file whose bytes differ
  in one byte, in length, or both, and accepts unchanged and deleted files;
* **the safe loader round-trips every plain container** ``torch.save`` writes and the weights-only
  unpickler allows (dict, OrderedDict, list, tuple, set, str, bytes, bytearray, int, float,
  complex, bool, None, ``torch.Size``, dtypes, devices, tensors of every dtype, parameters, sparse
  tensors), type for type and bit for bit, and keeps views sharing their storage.

Everything is exact (bytes and bits); no tolerance is involved.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invariance import files
from invariance.files import (
    FolderError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_files,
    check_output_dir,
    describe_files,
    remove_stale_temporaries,
    safe_torch_load,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# the temporary-file name atomic_write uses: .NAME.PID.RANDOM.tmp
TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Interrupted(Exception):
    pass


# ----------------------------------------------------------------------------- all or nothing


@settings(max_examples=30)
@given(old=st.none() | st.binary(max_size=64), new=st.binary(max_size=64), data=st.data(),
       error=st.sampled_from([OSError, KeyboardInterrupt]))
def test_a_write_is_all_or_nothing(old, new, data, error):
    """The writer writes ``new`` in two pieces and may fail (``OSError`` or Ctrl-C) after any number
    of bytes: on failure the target is exactly as before (``old`` bytes, or absent) and the folder
    holds nothing else; on success the target holds exactly ``new``."""
    with tempfile.TemporaryDirectory() as tmp:
        check_all_or_nothing(Path(tmp), old, new, data, error)


def check_all_or_nothing(folder: Path, old, new, data, error) -> None:
    target = folder / "data.bin"
    if old is not None:
        target.write_bytes(old)
    fail_at = data.draw(st.none() | st.integers(0, len(new)))

    def write(f):
        cut = len(new) if fail_at is None else fail_at
        f.write(new[:cut])
        if fail_at is not None:
            f.flush()
            raise error("interrupted")
        f.write(new[cut:])

    if fail_at is None:
        assert atomic_write(target, write) == target
        assert target.read_bytes() == new
    else:
        with pytest.raises(error):
            atomic_write(target, write)
        if old is None:
            assert not target.exists()
        else:
            assert target.read_bytes() == old
    assert listing(folder) == ([] if old is None and fail_at is not None else ["data.bin"])


def test_a_reader_of_the_old_file_keeps_reading_the_old_bytes(tmp_path):
    """The new file is renamed into place: a file opened before the write is the old file, whole."""
    target = tmp_path / "report.json"
    target.write_bytes(b"old content\n" * 100)
    with target.open("rb") as reader:
        head = reader.read(12)
        atomic_write_text(target, "new\n")
        rest = reader.read()
    assert head + rest == b"old content\n" * 100
    assert target.read_text() == "new\n"


def test_the_temporary_file_is_beside_the_target_and_named_for_this_process(tmp_path):
    """While writing, the only new file is ``.NAME.PID.XXXX.tmp`` in the target's folder, with this
    process's id (so a later write by another process knows whether its owner still runs, and keeps
    it meanwhile)."""
    seen = []

    def write(f):
        seen.extend(listing(tmp_path))
        assert remove_stale_temporaries(tmp_path) == []  # its owner (this process) runs
        f.write(b"x")

    atomic_write(tmp_path / "ck.pt", write)
    assert len(seen) == 1
    m = TMP.match(seen[0])
    assert m and m["name"] == "ck.pt" and int(m["pid"]) == os.getpid()
    assert listing(tmp_path) == ["ck.pt"]


def test_a_write_creates_missing_folders_and_gives_the_file_normal_permissions(tmp_path):
    """``mkstemp`` creates files readable by their owner only (0600); the written file has the mode
    an ordinary ``open`` would give it: ``0666`` less the umask."""
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "x"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_text_and_json_writes_round_trip(tmp_path):
    """UTF-8 text comes back as written; JSON keeps NaN and infinities (``allow_nan``), is indented by
    2 and ends with a newline."""
    text = "αβγ — ünïcode ✓\nsecond line"
    assert atomic_write_text(tmp_path / "t.txt", text).read_text(encoding="utf-8") == text
    obj = {"error": math.nan, "bound": math.inf, "list": [1, -math.inf], "name": "x"}
    raw = atomic_write_json(tmp_path / "r.json", obj).read_text()
    back = json.loads(raw)
    assert raw.endswith("}\n") and raw.startswith('{\n  "error": NaN')
    assert math.isnan(back["error"]) and back["bound"] == math.inf and back["list"] == [1, -math.inf]


# ----------------------------------------------------------------------------- check_output_dir


def test_check_output_dir_creates_nothing_and_leaves_no_probe(tmp_path):
    """A folder that can be created is accepted without being created; the write probe in the
    nearest existing folder is removed."""
    out = tmp_path / "x" / "y" / "report"
    assert check_output_dir(out) == out
    assert listing(tmp_path) == []
    assert check_output_dir(tmp_path) == tmp_path and listing(tmp_path) == []


def test_check_output_dir_names_the_argument(tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    with pytest.raises(ValueError, match=r"^report_dir: .*a_file.* is a file, not a folder"):
        check_output_dir(tmp_path / "a_file", "report_dir")
    with pytest.raises(ValueError, match=r"^out: cannot create the folder .*a_file.* is a file"):
        check_output_dir(tmp_path / "a_file" / "sub")
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_check_output_dir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_dir("~/reports") == tmp_path / "reports"
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- manifests


def test_describe_files_records_size_and_sha256_by_relative_path(tmp_path):
    """The known answer: ``hashlib.sha256`` of the bytes and their count, keyed by the POSIX path
    relative to the root."""
    (tmp_path / "sub").mkdir()
    a, b = tmp_path / "a.csv", tmp_path / "sub" / "b.png"
    a.write_bytes(b"x,y\n1,2\n")
    b.write_bytes(bytes(range(256)) * 5000)  # larger than one 1 MiB read chunk
    listed = describe_files([a, b], tmp_path)
    assert listed == {"a.csv": {"bytes": 8, "sha256": hashlib.sha256(b"x,y\n1,2\n").hexdigest()},
                      "sub/b.png": {"bytes": 1_280_000, "sha256": hashlib.sha256(b.read_bytes()).hexdigest()}}
    check_files(tmp_path, listed)  # unchanged: accepted


@settings(max_examples=30)
@given(content=st.binary(min_size=1, max_size=200), data=st.data())
def test_a_manifest_detects_any_changed_file(content, data):
    """One byte changed (same size: only the sha256 can tell), bytes appended or cut: refused, on one
    line naming the file. The folder as described: accepted."""
    with tempfile.TemporaryDirectory() as tmp:
        check_manifest(Path(tmp), content, data)


def check_manifest(root: Path, content: bytes, data) -> None:
    f = root / "report.csv"
    f.write_bytes(content)
    (root / "other.txt").write_bytes(b"unchanged")
    listed = describe_files([f, root / "other.txt"], root)
    check_files(root, listed)
    kind = data.draw(st.sampled_from(["flip", "append", "cut"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(content) - 1))
        changed = content[:i] + bytes([content[i] ^ data.draw(st.integers(1, 255))]) + content[i + 1:]
    elif kind == "append":
        changed = content + data.draw(st.binary(min_size=1, max_size=8))
    else:
        changed = content[:data.draw(st.integers(0, len(content) - 1))]
    f.write_bytes(changed)
    with pytest.raises(FolderError, match=r"report\.csv is not the file saved with manifest") as info:
        check_files(root, listed)
    assert "\n" not in str(info.value) and "other.txt" not in str(info.value)


def test_a_deleted_file_is_allowed_and_a_malformed_manifest_is_refused(tmp_path):
    f = tmp_path / "fig.png"
    f.write_bytes(b"png")
    listed = describe_files([f], tmp_path)
    f.unlink()
    check_files(tmp_path, listed)  # a user may delete a figure
    f.write_bytes(b"png")
    with pytest.raises(FolderError, match=r"report\.json: unreadable entry for fig\.png"):
        check_files(tmp_path, {"fig.png": {"bytes": 3}}, manifest="report.json")
    with pytest.raises(FolderError, match=r"manifest: unreadable list of files"):
        check_files(tmp_path, ["fig.png"])


# ----------------------------------------------------------------------------- stale temporaries


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    """Names that are not ``.NAME.PID.RANDOM.tmp`` are never touched, whatever number they hold; a
    folder that does not exist has nothing to remove."""
    dead = 999_999_999  # above any pid_max
    keep = ["report.json", f".report.json.{dead}.tmp", f"report.json.{dead}.abcd.tmp", f".report.json.{dead}.abcd",
            f".report.json.x{dead}.abcd.tmp", f".report.json.{os.getpid()}.abcd.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"")
    stale = tmp_path / f".ck.pt.{dead}.k2j4.tmp"
    stale.write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert listing(tmp_path) == sorted(keep)
    assert remove_stale_temporaries(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- the safe loader


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return safe_torch_load(buf)


def bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def same(a, b) -> bool:
    """Equal, type for type (tensors: dtype, shape, layout and bits, so NaN payloads count too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.is_sparse or b.is_sparse:
            return a.is_sparse and b.is_sparse and same(a.to_dense(), b.to_dense())
        return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_of_every_dtype_come_back_bit_for_bit(dtype):
    """Random values of every dtype (with NaN and infinities for the floating ones), a 0-d tensor and
    a non-contiguous view: the same bits, dtype and shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) * 50
    if dtype.is_floating_point or dtype.is_complex:
        x[0, :2] = torch.tensor([math.nan, -math.inf])
        t = x.to(dtype)
    else:
        t = x.clamp(0 if dtype == torch.uint8 else -100, 100).to(dtype)
    obj = {"t": t, "scalar": t[1, 1].clone(), "transposed": t.T}
    back = roundtrip(obj)
    assert same(back, obj)


def test_the_plain_values_come_back_type_for_type():
    """Every plain value type the weights-only unpickler allows."""
    obj = {"str": "é✓", "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"), "int": 2 ** 70, "negative": -3,
           "float": 1.5, "nan": math.nan, "inf": -math.inf, "complex": 1 + 2j, "bool": True, "none": None,
           "size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"),
           "set": {1, 2, "a"}, "tuple": (1, (2, [3])), "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
           "parameter": torch.nn.Parameter(torch.ones(2)), "sparse": torch.eye(3).to_sparse(),
           "int_keys": {3: "x", -1: "y"}, "empty": [[], (), {}, ""]}
    back = roundtrip(obj)
    assert same(back, obj), {k: (obj[k], back[k]) for k in obj if not same(obj[k], back[k])}
    assert back["parameter"].requires_grad


def test_views_keep_sharing_their_storage():
    """``torch.save`` writes a storage once for all its views; loading restores the sharing (the
    optimiser's state and a model's tied weights rely on it)."""
    base = torch.arange(6.0)
    back = roundtrip({"base": base, "view": base[2:4], "same": base})
    back["base"][2] = -1.0
    assert back["view"][0] == -1.0 and back["same"] is back["base"]


# empty bytes are left out: see test_an_empty_bytes_value_round_trips
leaves = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
          | st.text(max_size=8) | st.binary(min_size=1, max_size=8) | st.complex_numbers(allow_nan=False)
          | st.builds(lambda v, d: torch.tensor(v, dtype=d), st.lists(st.floats(-1e3, 1e3), max_size=4),
                      st.sampled_from([torch.float64, torch.float32, torch.float16])))
keys = st.text(max_size=6) | st.integers(-5, 5)
containers = st.recursive(leaves, lambda inner: (
    st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(keys, inner, max_size=4)
    | st.dictionaries(keys, inner, max_size=4).map(collections.OrderedDict)), max_leaves=12)


@settings(max_examples=40)
@given(obj=containers)
def test_the_safe_loader_round_trips_nested_plain_containers(obj):
    assert same(roundtrip(obj), obj)


def test_an_empty_bytes_value_is_refused_as_the_docstring_says():
    """torch's weights-only unpickler refuses ``b''`` (pickle protocol 2 writes it as a call of
    ``builtins.bytes``, which torch does not allow); the safe loader documents that it reads only
    what that unpickler reads, and refuses the rest without running it."""
    with pytest.raises(files.UntrustedFileError, match="the weights-only unpickler does not read"):
        roundtrip({"payload": b""})


def test_a_file_path_round_trips_and_a_missing_one_is_named(tmp_path):
    obj = {"w": torch.ones(2, 2), "step": 3}
    path = atomic_torch_save(tmp_path / "state.pt", obj)
    assert same(safe_torch_load(path), obj)
    with pytest.raises(ValueError, match=r"^state: file '.*nothing\.pt' not found"):
        safe_torch_load(tmp_path / "nothing.pt", what="state")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"^state: .*text\.pt is corrupt, truncated or not a torch file") as info:
        safe_torch_load(tmp_path / "text.pt", what="state")
    assert "\n" not in str(info.value)


def test_the_files_module_exports_what_it_documents():
    for name in files.__all__:
        assert hasattr(files, name), name
