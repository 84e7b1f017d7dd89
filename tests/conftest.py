"""Shared fixtures: a per-session cache directory, the demo (trained once per run), its engine.

``TFA_TEST_THREADS=n`` runs the session with ``torch.set_num_threads(n)`` (`make
test-portability` sets it to 1, with ``OMP_NUM_THREADS=1``, to change every reduction's split).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Set at import time, before anything reads it, so notebook kernels and Voila servers started by
# tests inherit the same cache and reuse the demo model trained once for the whole run.
if not os.environ.get("TFA_CACHE_DIR"):
    _session_cache = tempfile.mkdtemp(prefix="tfa-test-cache-")
    os.environ["TFA_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

if os.environ.get("TFA_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TFA_TEST_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "portability: numerical; `make test-portability` reruns it under other thread counts "
        "and CPU kernels",
    )


def pytest_report_header() -> str:
    """Name the numerical configuration of the run: torch threads and the CPU kernels it takes."""
    return (
        f"torch {torch.__version__}: {torch.get_num_threads()} threads, CPU kernels "
        f"{torch.backends.cpu.get_cpu_capability()} "
        f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})"
    )


@pytest.fixture(scope="session")
def demo():
    """The embedded demo (``tfa_widgets.data.load_demo()``), trained once per test run."""
    from tfa_widgets.data import load_demo

    return load_demo(progress=False)


@pytest.fixture(scope="session")
def demo_engine(demo):
    """A ``TFAEngine`` on the demo, with its index cached under the session cache directory."""
    return demo.engine()
