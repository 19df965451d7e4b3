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


def cpu_times() -> dict:
    """This process's user and system CPU seconds and minor page faults so far (``getrusage``)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "system": r.ru_stime, "minor_faults": r.ru_minflt}


def cpu_share(before: dict, after: dict) -> dict:
    """User and system seconds between two :func:`cpu_times`, the system share of their sum and the
    page faults in between (the issue "near the limit" wants the system share at most 5%)."""
    user, system = after["user"] - before["user"], after["system"] - before["system"]
    return {"user_s": user, "system_s": system, "system_share": system / max(user + system, 1e-9),
            "minor_faults": after["minor_faults"] - before["minor_faults"]}


def machine() -> dict:
    """The machine a benchmark runs on, for its record: platform, CPU, cores, torch and its threads,
    Python, and the GPU (None without CUDA)."""
    import os
    import platform

    import torch

    return {"platform": platform.platform(), "cpu": cpu_model("unknown"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_record(load_before) -> dict:
    """:func:`machine` with the load average before (``load_before``, taken at the start) and now."""
    import os

    return {**machine(), "load_before": load_before, "load_after": os.getloadavg()}
