"""Child of ``bench_fresh_battery.py --cost-against``: time ``invariance.align`` (default settings) of
one source tree on saved cases, in this fresh process, on one thread.

    python benchmarks/_time_search.py ROOT CASES.pt

``ROOT`` is the repository whose ``invariance`` is imported (a checkout of another commit, or this
one); ``CASES.pt`` a list of dicts of tensors (``reference``, ``moving``, ``mask``, ``moving_mask``,
``expected``) and the ``family``, read with ``weights_only=True``. Prints one JSON line: the
seconds per case and the errors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    root, cases_path = Path(sys.argv[1]).resolve(), sys.argv[2]
    sys.path.insert(0, str(root))
    import torch

    import invariance

    if not Path(invariance.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"ROOT: imported invariance from {invariance.__file__}, not from {root}")
    torch.set_num_threads(1)
    cases = torch.load(cases_path, weights_only=True)
    seconds, errors = [], []
    for c in cases:
        t0 = time.perf_counter()
        out = invariance.align(c["reference"], c["moving"], c["family"], mask=c["mask"],
                               moving_mask=c["moving_mask"], expected=c["expected"])
        seconds.append(time.perf_counter() - t0)
        errors.append(out.errors.tolist())
    print(json.dumps({"seconds": seconds, "errors": errors}))


if __name__ == "__main__":
    main()
