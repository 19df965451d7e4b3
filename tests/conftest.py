"""Shared test configuration: hypothesis profiles, the ``device`` fixture and data-set fixtures.

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

# Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread;
# alone, a test may use two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids the thread pool's synchronisation, which is slow on a busy machine.
    Use in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path_factory, monkeypatch):
    """Each test its own user cache (``XDG_CACHE_HOME``): a floor kept by one test (the floor cache of
    ``measure``) never answers another, whose monkeypatched search it would bypass."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_root():
    """The data folder from ``INVARIANCE_DATA``; tests that need it are skipped with a reason."""
    root = os.environ.get("INVARIANCE_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("data set not available: set INVARIANCE_DATA to a folder with mnist/ and fashion-mnist/")
    return root


@pytest.fixture(scope="module", params=[
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")),
])
def device(request) -> torch.device:
    """The device a numeric test computes on: ``cpu`` always, ``cuda`` where a GPU is present (skipped
    with the reason otherwise). Inputs are built on the CPU as before and moved with ``.to(device)``,
    so the CPU case computes the very same numbers; results come back with ``.cpu()`` for the
    comparisons.

    Module scope: a ``torch.device`` is immutable, so sharing it across a module's tests is safe, and
    hypothesis ``@given`` tests can take it without the function-scoped-fixture health check (the
    value is the same for every example). Pytest groups a module's tests by device (all CPU cases,
    then all CUDA cases)."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> str:
    """A fake MNIST of 40 digits (stn.testing.write_fake_dataset); modules that need another size
    define their own."""
    from stn.testing import write_fake_dataset

    return str(write_fake_dataset(tmp_path_factory.mktemp("data"), n=40))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fake_root):
    """A finished one-epoch ``stn train`` run folder (stn.testing.train_argv) on ``fake_root``."""
    from stn import _cli as stn_cli
    from stn.testing import train_argv

    out = tmp_path_factory.mktemp("runs") / "cnn"
    assert stn_cli.main([str(a) for a in train_argv(out, fake_root)]) == 0
    return out
