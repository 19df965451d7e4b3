"""Shared test configuration: hypothesis profiles and data-set fixtures.

Profiles: ``ci`` (derandomised, no deadline: CI never flakes; the default under ``make test``),
``dev`` (random, fewer examples) and ``thorough``. Choose with ``HYPOTHESIS_PROFILE``; rerun the
property tests with another seed with ``HYPOTHESIS_PROFILE=dev pytest --hypothesis-seed=N``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids the thread pool's synchronisation, which is slow on a busy machine.
    Use in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_root():
    """The data folder from ``INVARIANCE_DATA``; tests that need it are skipped with a reason."""
    root = os.environ.get("INVARIANCE_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("data set not available: set INVARIANCE_DATA to a folder with mnist/ and fashion-mnist/")
    return root
