"""What the benchmarks record about the machine they ran on (shared by the benchmark scripts)."""

from __future__ import annotations

from pathlib import Path


def cpu_model(default: str = "unknown") -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``default`` where that is not readable).

    >>> isinstance(cpu_model(), str)
    True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def write_results(folder, stem: str, out: dict, text: str) -> None:
    """Write ``STEM.json`` (``out``) and ``STEM.md`` (``text``) atomically into ``folder``; print the text."""
    from invariance.files import atomic_write_json, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{stem}.json", out)
    atomic_write_text(folder / f"{stem}.md", text)
    print(text, flush=True)
