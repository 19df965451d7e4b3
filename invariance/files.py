"""Safe file writing: nothing is ever half-written, and nothing temporary stays behind.

* :func:`atomic_write` writes a file through a temporary file beside it (``.NAME.PID.XXXX.tmp``),
  fsyncs it and renames it into place; the temporary file is removed on every exit path Python
  sees (an exception, Ctrl-C, SIGTERM once :func:`exit_on_sigterm` is installed). A process killed
  with SIGKILL cannot clean up: the temporary files of dead processes are removed by the next
  write into the same folder, and by :func:`remove_stale_temporaries`.
* A folder of files is written as a whole by writing its manifest last: a file listing the
  size and sha256 of every file written before it (:func:`describe_files`; ``report.json`` is
  the manifest of a report folder). :func:`check_files` then refuses a folder that mixes an old
  manifest with newer files (a save killed half-way) or whose files changed since.
* :func:`check_output_dir` checks, before any computation, that an output folder can be created
  and written.
* :func:`safe_torch_load` reads a ``torch.save`` file without running code from it: tensors and
  plain containers only (``torch.load(weights_only=True)``); a file holding other Python objects
  is refused with :class:`UntrustedFileError`, saying how to allow it for a file the user trusts.

Threat model of loading: a checkpoint, an image file or a report from someone else is *data*.
Reading it must never run code (pickle can: an object's ``__reduce__`` names any function to
call), so every ``.pt`` is read with the weights-only unpickler, ``.npy`` files without pickle,
reports as JSON, and a checkpoint may name only a registered builder
(:func:`invariance.register_builder`). Code runs only where the user names it: ``FILE.py:NAME``
or ``module:NAME`` on the command line, or ``trust_code=True`` / ``--trust-code``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "check_output_dir",
           "remove_stale_temporaries", "describe_files", "check_files", "FolderError", "exit_on_sigterm",
           "safe_torch_load", "UntrustedFileError", "TRUST_HINT", "user_cache_dir"]

MANIFEST = "manifest"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


class FolderError(ValueError):
    """An output folder was written only in part (an interrupted save) or changed since."""


class UntrustedFileError(ValueError):
    """A file holds Python objects whose loading could run code, and its source was not trusted."""


TRUST_HINT = ("load it only if you trust its source: trust_code=True in Python, --trust-code on the "
              "command line")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files left in ``folder`` by :func:`atomic_write` calls of processes
    that no longer run (killed with SIGKILL, power loss); returns the files removed."""
    removed = []
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def user_cache_dir() -> Path:
    """The package's folder in the user cache: ``$XDG_CACHE_HOME/invariance`` (an absolute
    ``XDG_CACHE_HOME``), else ``~/.cache/invariance``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "invariance"
    return Path.home() / ".cache" / "invariance"


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | os.PathLike, map_location="cpu", *, what: str = "file",
                    trust_code: bool = False, hint: str = TRUST_HINT) -> Any:
    """``torch.load`` that runs no code from the file: tensors, numbers, strings and plain
    containers only (the weights-only unpickler), unless ``trust_code`` is true.

    ``what`` starts the one-line errors (the argument the file came from), ``hint`` ends the
    refusal of an untrusted file (how to allow it, or what to save instead). A file holding other
    Python objects (a pickled class, a function to call) raises :class:`UntrustedFileError`, and so
    does a value torch's weights-only unpickler does not read (``b''``, a ``frozenset``, a file
    written with pickle protocol 4 or 5): only what that unpickler reads is read;
    a missing, truncated or foreign file raises ``ValueError``; nothing in the file runs.

    >>> import io, os, torch
    >>> class Payload:
    ...     def __reduce__(self):
    ...         return (os.system, ("echo pwned",))
    >>> buf = io.BytesIO(); torch.save({"w": Payload()}, buf); _ = buf.seek(0)
    >>> safe_torch_load(buf, what="model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    invariance.files.UntrustedFileError: model: <...> holds Python objects other than tensors ...
    """
    import pickle
    import warnings

    import torch

    name = path if isinstance(path, (str, os.PathLike)) else f"<{type(path).__name__}>"
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise ValueError(f"{what}: file {str(name)!r} not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=not trust_code)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust_code and ("Weights only load failed" in text or "weights_only" in text) and _unsafe(text):
            found = re.search(r"GLOBAL ([\w.]+)", text)
            detail = f" (it names {found[1]!r})" if found else ""
            raise UntrustedFileError(f"{what}: {name} holds Python objects other than tensors and plain "
                                     f"containers{detail}, which the weights-only unpickler does not read; "
                                     f"unpickling them could run code; {hint}") from None
        found = re.search(r"Unsupported operand (\d+)", text)
        detail = f"byte {found[1]} is no pickle instruction" if found else f"UnpicklingError: {_first_line(text)}"
        raise ValueError(f"{what}: {name} is corrupt, truncated or not a torch file ({detail})") from None
    except Exception as exc:  # a truncated zip, a foreign format, an unknown storage location ...
        raise ValueError(f"{what}: {name} is corrupt, truncated or not a torch file ({type(exc).__name__}: "
                         f"{_first_line(str(exc))})") from None


def _unsafe(text: str) -> bool:
    """Whether the weights-only unpickler refused a real pickle instruction (an object to build, a
    function to call) rather than bytes that are no pickle at all (a corrupt file)."""
    import pickletools

    found = re.search(r"Unsupported operand (\d+)", text)
    if found is None:
        return True  # a blocked global, a class, a reduce: the file asks for code
    return chr(int(found[1])) in {op.code for op in pickletools.opcodes}


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else "unreadable"


def check_output_dir(path: str | os.PathLike, argument: str = "out") -> Path:
    """Check that ``path`` is, or can be created as, a folder this process can write to.

    Raises ``ValueError("ARGUMENT: ...")`` when ``path`` is a file, lies under a file, or the
    folder (or the nearest existing folder above it) is not writable. Creates nothing.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{argument}: {str(path)!r} is a file, not a folder; give a folder (created if missing)")
    q = p.absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise ValueError(f"{argument}: cannot create the folder {str(path)!r}: {str(q)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{os.getpid()}.", suffix=".tmp", dir=q)
    except OSError as exc:
        what = "the folder" if q == p.absolute() else f"the folder {str(path)!r}: {str(q)!r}"
        raise ValueError(f"{argument}: cannot write into {what} ({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(paths, root: str | os.PathLike) -> dict[str, dict]:
    """``{relative path: {"bytes": size, "sha256": digest}}`` of ``paths`` (files under ``root``):
    the list a file written last (a manifest) keeps of the files written before it."""
    root = Path(root).resolve()
    out = {}
    for f in paths:
        f = Path(f)
        out[f.resolve().relative_to(root).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    return out


def check_files(root: str | os.PathLike, listed: dict, manifest: str = MANIFEST) -> None:
    """Raise :class:`FolderError` if a file listed by :func:`describe_files` differs from the one
    on disk: the folder then mixes two saves (one interrupted) or was changed since. Missing files
    are allowed (a user may delete a figure)."""
    root = Path(root)
    try:
        items = list(listed.items())
    except AttributeError:
        raise FolderError(f"{root}: {manifest}: unreadable list of files") from None
    for rel, entry in items:
        f = root / rel
        if not f.is_file():
            continue
        try:
            same = f.stat().st_size == entry["bytes"] and _sha256(f) == entry["sha256"]
        except (KeyError, TypeError):
            raise FolderError(f"{root}: {manifest}: unreadable entry for {rel}") from None
        if not same:
            raise FolderError(f"{root}: {rel} is not the file saved with {manifest} (size or sha256 differ): the "
                              f"folder mixes two saves (one interrupted) or was changed since; save it again")


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so that ``finally`` blocks and the
    removal of temporary files run (the default action kills the process on the spot). The
    previous handler is restored afterwards; a no-op outside the main thread."""
    def _handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
