"""Serving with Voila through ``tfa-widgets``: kernels end with their page, idle ones are culled.

Each test starts ``tfa-widgets serve|demo`` (which becomes a Voila server), drives headless
chromium against it and counts the server's kernel processes. The first-render test measures and
reports (``test-artifacts/browser_latency.txt``), it does not assert a time. Without chromium or
playwright the tests skip, unless ``TFA_REQUIRE_BROWSER=1``, where they fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest
from browser_support import (
    ARTIFACTS,
    free_port,
    launch_chromium,
    report_latency,
    require_browser,
    stop_process,
)

from tfa_widgets import serving

ROOT = Path(__file__).resolve().parents[1]
RENDER_TIMEOUT_MS = 240_000
# All pages of the users-at-once test together (four took 214-248 s on a busy two-core machine).
USERS_RENDER_TIMEOUT_S = 480
pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The culling test's idle timeout: long enough that a page under load connects its websocket
# before the culler looks (it only culls kernels with no connection), short enough to wait for.
TEST_IDLE_TIMEOUT_S = 20

PROBE_CODE = "import ipywidgets\nipywidgets.IntSlider(description='probe').add_class('tfa-probe')"


class CliServer:
    """``tfa-widgets <argv> --port P`` as a subprocess (Voila once it has started); always stopped.

    The server's Jupyter data dir (notebook signatures) is a temporary one, so the tests leave the
    user's own signature store alone.
    """

    def __init__(self, argv: list[str], workdir: Path, name: str, start_timeout_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.argv, self.workdir, self.start_timeout_s = argv, workdir, start_timeout_s
        self.log_path = ARTIFACTS / f"{name}.log"

    def __enter__(self) -> CliServer:
        ARTIFACTS.mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        env = {**os.environ, "JUPYTER_DATA_DIR": str(self.workdir / "jupyter-data")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tfa_widgets.cli", *self.argv, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tfa-widgets exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "voila/static/", timeout=2):
                    return self
            except urllib.error.HTTPError:  # any HTTP answer means the server is up
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"no server within {self.start_timeout_s} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        stop_process(self.process)
        self._log.close()

    def kernels(self) -> list[psutil.Process]:
        """Return the server's live kernel processes."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        alive = []
        for child in children:
            try:
                if "ipykernel" in " ".join(child.cmdline()) and child.status() != "zombie":
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def wait_for_kernels(self, count: int, timeout_s: float) -> float:
        """Wait until exactly ``count`` kernels run; return the seconds waited."""
        start = time.monotonic()
        while len(self.kernels()) != count:
            if time.monotonic() - start > timeout_s:
                raise AssertionError(
                    f"{len(self.kernels())} kernels after {timeout_s:.0f} s, expected {count};"
                    f" see {self.log_path}"
                )
            time.sleep(0.25)
        return time.monotonic() - start

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()


@pytest.fixture()
def probe_notebook(tmp_path) -> Path:
    """A notebook showing one slider: a Voila page with a live widget, in a second."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PROBE_CODE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def chromium():
    """Yield a headless system chromium (a fresh temporary profile)."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield browser
        finally:
            browser.close()


def _open(context, url: str, selector: str = ".tfa-probe"):
    page = context.new_page()
    page.goto(url, timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(selector, timeout=RENDER_TIMEOUT_MS)
    return page


def test_closing_or_reloading_a_page_shuts_its_kernel_down(probe_notebook, tmp_path, chromium):
    # The idle timeout is far longer than the test: only the page-close shutdown can end kernels.
    argv = ["serve", str(probe_notebook), "--idle-timeout", "3600"]
    with CliServer(argv, tmp_path, "serving_close") as server:
        baseline = len(server.kernels())
        context = chromium.new_context()
        first, second = _open(context, server.url), _open(context, server.url)
        server.wait_for_kernels(baseline + 2, timeout_s=30)
        first.reload(timeout=RENDER_TIMEOUT_MS)  # the reloaded page gets a new kernel
        first.wait_for_selector(".tfa-probe", timeout=RENDER_TIMEOUT_MS)
        server.wait_for_kernels(baseline + 2, timeout_s=30)
        first.close(run_before_unload=True)
        second.close(run_before_unload=True)
        waited = server.wait_for_kernels(baseline, timeout_s=30)
        log = server.log()
    report_latency(
        f"kernels after closing 2 pages (one reloaded): back to {baseline} in {waited:.1f} s"
    )
    refused = re.search(r"\b403\b.*POST|POST.*\b403\b|'_xsrf' argument missing", log)
    assert refused is None, f"the page-close shutdown was refused: {refused and refused.group(0)}"
    assert log.count("Kernel shutdown") >= 3  # the reloaded page's, then the two closed pages'
    assert "without encryption" not in log


def test_kernels_without_an_open_page_are_culled_after_the_idle_timeout(
    probe_notebook, tmp_path, chromium
):
    argv = ["serve", str(probe_notebook), "--idle-timeout", str(TEST_IDLE_TIMEOUT_S)]
    with CliServer(argv, tmp_path, "serving_cull") as server:
        baseline = len(server.kernels())
        with urllib.request.urlopen(server.url, timeout=120) as response:  # a health check
            assert "tfa-probe" in response.read().decode()
        context = chromium.new_context()
        vanished = _open(context, server.url)
        kept = _open(context, server.url)
        server.wait_for_kernels(baseline + 3, timeout_s=30)
        vanished.close(run_before_unload=False)  # a crashed tab: no goodbye, the socket drops
        # The culler ends a kernel idle for the timeout, checking every interval; a busy machine
        # can delay it by a few seconds more, so allow twice the timeout plus ten seconds.
        waited = server.wait_for_kernels(baseline + 1, timeout_s=2 * TEST_IDLE_TIMEOUT_S + 10)
        # The open page was idle as long as the others, but connected: it keeps its kernel.
        time.sleep(serving.cull_interval_s(TEST_IDLE_TIMEOUT_S) * 2)
        assert len(server.kernels()) == baseline + 1
        assert kept.locator(".tfa-probe").count() == 1
        log = server.log()
    report_latency(
        f"idle kernels (a plain GET, a tab closed without unload) culled after {waited:.1f} s"
        f" (idle timeout {TEST_IDLE_TIMEOUT_S} s); the open page's kernel kept"
    )
    assert log.count("due to") >= 2, "the culler did not end the two kernels"  # "... inactivity"


def _wait_until_rendered(kernel: psutil.Process, timeout_s: float = 600) -> None:
    """Wait until a preheated kernel has run the notebook: it has worked, then stopped working."""

    def cpu_s() -> float:
        return sum(kernel.cpu_times()[:2])

    deadline, still = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and still < 3:
        before = cpu_s()
        time.sleep(2)
        # Importing torch alone takes seconds of CPU; a kernel that runs, even starved on a busy
        # machine, gains far more than 20 ms in 2 s, while an idle one gains almost nothing.
        still = still + 1 if before > 2 and cpu_s() - before < 0.02 else 0
    if still < 3:
        raise TimeoutError("the preheated kernel did not finish running the notebook")


def _first_render(context, url: str) -> tuple[float, float]:
    """Open the explorer; return seconds until the gallery shows, then until the top-k do."""
    page = context.new_page()
    start = time.perf_counter()
    page.goto(url, timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(".tfa-gallery .nsewdrag", state="attached", timeout=RENDER_TIMEOUT_MS)
    gallery = time.perf_counter() - start
    page.wait_for_selector(".tfa-topk image", state="attached", timeout=RENDER_TIMEOUT_MS)
    return gallery, time.perf_counter() - start


def _memory_line(kernel: psutil.Process) -> str:
    info = kernel.memory_full_info()
    mib = {k: getattr(info, k) / 2**20 for k in ("rss", "pss", "uss")}
    return "RSS {rss:.0f} MiB, PSS {pss:.0f} MiB, USS {uss:.0f} MiB".format(**mib)


@pytest.mark.parametrize("pool_size", [0, 1])
def test_first_render_of_the_explorer_is_reported(pool_size, tmp_path, chromium, demo_engine):
    """Measure (not assert) the first render of ``tfa-widgets demo``, with or without preheating."""
    demo_engine.build_index()  # trained and indexed in the session cache first
    argv = ["demo", "--pool-size", str(pool_size), "--idle-timeout", "3600"]
    with CliServer(argv, tmp_path, f"serving_demo_pool{pool_size}") as server:
        if pool_size:
            server.wait_for_kernels(pool_size, timeout_s=120)
            for kernel in server.kernels():
                _wait_until_rendered(kernel)
        context = chromium.new_context(viewport={"width": 1440, "height": 900})
        gallery, topk = _first_render(context, server.url)
        line = (
            f"first render, 1 user, pool size {pool_size}: gallery {gallery:.1f} s,"
            f" top-k {topk:.1f} s"
        )
        if pool_size == 0:
            line += f"; the page's kernel: {_memory_line(server.kernels()[0])}"
        report_latency(line + f" (load average {os.getloadavg()[0]:.1f})")
        log = server.log()
    assert "Traceback" not in log, f"see {server.log_path}"
    assert "not trusted" not in log and "without encryption" not in log
    if pool_size:
        assert "Using pre-heated kernel" in log


def test_first_render_for_users_at_once_is_reported(tmp_path, chromium, demo_engine):
    """Measure (not assert) the first render of ``TFA_RENDER_USERS`` pages opened at once (4 by
    default), with as many preheated kernels, and the memory those kernels hold."""
    users = int(os.environ.get("TFA_RENDER_USERS", "4"))
    demo_engine.build_index()
    argv = ["demo", "--pool-size", str(users), "--idle-timeout", "3600"]
    with CliServer(argv, tmp_path, f"serving_demo_users{users}") as server:
        server.wait_for_kernels(users, timeout_s=240)
        for kernel in server.kernels():
            _wait_until_rendered(kernel)
        pool = [k.memory_full_info() for k in server.kernels()]
        # One context (cookie jar) per user; each goto returns once the page starts to stream,
        # so the pages load at the same time.
        pages, start = [], time.perf_counter()
        for _ in range(users):
            page = chromium.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.goto(server.url, wait_until="commit", timeout=RENDER_TIMEOUT_MS)
            pages.append(page)
        done, deadline = [], start + USERS_RENDER_TIMEOUT_S
        for page in pages:
            remaining_ms = max(1_000, 1000 * (deadline - time.perf_counter()))
            page.wait_for_selector(".tfa-topk image", state="attached", timeout=remaining_ms)
            done.append(time.perf_counter() - start)
        load = os.getloadavg()[0]
        log = server.log()
    rss, pss = (sum(getattr(m, f) for m in pool) / 2**20 for f in ("rss", "pss"))
    report_latency(
        f"first render, {users} users at once, pool size {users}: top-k after"
        f" {min(done):.1f}-{max(done):.1f} s; the {users} preheated kernels hold RSS {rss:.0f}"
        f" MiB, PSS {pss:.0f} MiB in all (load average {load:.1f})"
    )
    assert log.count("Using pre-heated kernel") >= users, f"see {server.log_path}"
    assert "Traceback" not in log, f"see {server.log_path}"
