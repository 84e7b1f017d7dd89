"""Shared fixtures: a per-session cache directory, the demo (trained once per run), its engine."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Set at import time, before anything reads it, so notebook kernels and Voila servers started by
# tests inherit the same cache and reuse the demo model trained once for the whole run.
if not os.environ.get("TFA_CACHE_DIR"):
    _session_cache = tempfile.mkdtemp(prefix="tfa-test-cache-")
    os.environ["TFA_CACHE_DIR"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo (``tfa_widgets.data.load_demo()``), trained once per test run."""
    from tfa_widgets.data import load_demo

    return load_demo(progress=False)


@pytest.fixture(scope="session")
def demo_engine(demo):
    """A ``TFAEngine`` on the demo, with its index cached under the session cache directory."""
    return demo.engine()
