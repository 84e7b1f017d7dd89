"""The explorer notebook in real JupyterLab 4 and Notebook 7 front ends, driven in chromium.

One Jupyter server (``jupyter lab``, which serves Notebook 7 too) runs for the module, with a
token, in a temporary directory holding copies of ``notebooks/explorer.ipynb``, and with its own
config, data, settings and workspace directories (the user's are left alone). JupyterLab opens
with its file browser open, in a window sized so that the notebook's output area is about
570 px wide, the narrow column of a laptop. Checked there: all cells run without an error or a
warning box; a gallery click updates the proponent strip; nothing is cut off (every part of the
explorer inside the output area, or that area scrolls); JupyterLab's Dark theme reaches the
Plotly figures; a saved notebook reloaded shows the explorer again from the running kernel,
without running a cell. In Notebook 7 the top-k slider answers the arrow keys. Without chromium
or playwright the tests skip, unless ``TFA_REQUIRE_BROWSER=1``, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser_support import (
    ARTIFACTS,
    TITLE_FILLS_JS,
    UPDATE_TIMEOUT_MS,
    click_tile,
    free_port,
    launch_chromium,
    report_latency,
    require_browser,
    signature,
    stop_process,
    wait_changed,
)

ROOT = Path(__file__).resolve().parents[1]
RENDER_TIMEOUT_MS = 300_000
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
TOKEN = "tfa-browser-test"
# With the file browser open (JupyterLab's default), this window leaves the notebook's output
# area about 570 px wide (measured and checked in the tests).
LAB_VIEWPORT = {"width": 1000, "height": 1000}
NARROW_OUTPUT_PX = (520, 620)
pytestmark = [pytest.mark.browser, pytest.mark.slow]

APP_READY_JS = """() => !!(window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')
  && document.querySelector('.jp-Notebook .jp-Cell .jp-InputArea-editor'))"""

# The explorer's parts whose right edge must stay inside the output area.
PARTS_JS = """() => {
  const out = document.querySelector('.tfa-explorer').closest('.jp-OutputArea-output');
  const area = out.getBoundingClientRect();
  const box = (el) => { const r = el.getBoundingClientRect();
                        return [r.left, r.top, r.right, r.bottom]; };
  const parts = {};
  const named = {gallery: '.tfa-gallery .main-svg', test: '.tfa-test .main-svg',
                 probabilities: '.tfa-probs .main-svg', strip: '.tfa-topk .main-svg',
                 detail: '.tfa-detail .main-svg', controls: '.tfa-controls'};
  for (const [name, sel] of Object.entries(named)) {
    const el = document.querySelector(sel); if (el) parts[name] = box(el);
  }
  document.querySelectorAll('.tfa-explorer .widget-slider .noUi-target').forEach(
    (el, i) => { parts['slider ' + i] = box(el); });
  const cut = Array.from(document.querySelectorAll('.tfa-explorer button'))
    .filter(b => b.offsetParent && b.scrollWidth > b.clientWidth + 1).map(b => b.innerText);
  return {area: [area.left, area.top, area.right, area.bottom], parts: parts, cutButtons: cut,
          scrolls: out.scrollWidth > out.clientWidth + 1
                   && ['auto', 'scroll'].includes(getComputedStyle(out).overflowX)};
}"""

# The open notebook's kernel has started and waits for work.
KERNEL_IDLE_JS = """() => { const w = window.jupyterapp.shell.currentWidget;
  const s = w && w.sessionContext && w.sessionContext.session;
  return !!(s && s.kernel && s.kernel.status === 'idle'); }"""

PAPER_JS = """() => Array.from(document.querySelectorAll('.tfa-explorer .js-plotly-plot'))
  .map(gd => gd._fullLayout.paper_bgcolor.replace(/\\s/g, ''))"""


class JupyterServer:
    """``jupyter lab`` on a free port with a token, in ``workdir``; a context manager."""

    def __init__(self, workdir: Path, log_path: Path, timeout_s: float = 180.0) -> None:
        self.workdir, self.log_path, self.timeout_s = workdir, log_path, timeout_s
        self.root = workdir / "root"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> JupyterServer:
        root = self.root
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        for name in ("config", "data", "runtime", "settings", "workspaces"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        env.update(
            JUPYTER_CONFIG_DIR=str(self.workdir / "config"),
            JUPYTER_DATA_DIR=str(self.workdir / "data"),
            JUPYTER_RUNTIME_DIR=str(self.workdir / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(self.workdir / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.workdir / "workspaces"),
        )
        # No "get notified about news?" pop-up over the notebook.
        news = self.workdir / "settings" / "@jupyterlab" / "apputils-extension"
        news.mkdir(parents=True, exist_ok=True)
        (news / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        jupyter = Path(sys.executable).with_name("jupyter")
        command = [
            str(jupyter) if jupyter.exists() else "jupyter",
            "lab",
            "--no-browser",
            f"--port={self.port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--allow-root",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=root, env=env
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={TOKEN}", timeout=2):
                    return self
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"jupyter lab did not answer in {self.timeout_s} s; {self.log_path}")

    def __exit__(self, *exc) -> None:
        stop_process(self.process)
        self._log.close()

    def page_url(self, front_end: str, notebook: str) -> str:
        """Return the URL opening ``notebook`` in ``"lab"`` (JupyterLab) or Notebook 7."""
        where = "lab/tree" if front_end == "lab" else "notebooks"
        return f"{self.url}/{where}/{notebook}?token={TOKEN}"


@pytest.fixture(scope="module")
def jupyter(demo_engine, tmp_path_factory):
    """Yield the module's Jupyter server and a chromium to visit it."""
    require_browser()
    from playwright.sync_api import sync_playwright

    demo_engine.build_index()  # trained and indexed in the session cache first
    workdir = tmp_path_factory.mktemp("jupyter")
    (workdir / "root").mkdir()
    for name in ("lab.ipynb", "nb7.ipynb"):  # one kernel each
        shutil.copy(ROOT / "notebooks" / "explorer.ipynb", workdir / "root" / name)
    with JupyterServer(workdir, ARTIFACTS / "jupyter.log") as server, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield server, browser
        finally:
            browser.close()


def _open(page, url: str) -> None:
    page.goto(url, timeout=RENDER_TIMEOUT_MS)
    page.wait_for_function(APP_READY_JS, timeout=RENDER_TIMEOUT_MS)
    # Notebook 7 may ask which kernel to start (its preferred one is selected): accept.
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    try:
        accept.wait_for(state="visible", timeout=5_000)
    except Exception:  # playwright's TimeoutError: no dialog
        return
    accept.click()


def _run_all(page, shot: str) -> float:
    """Run every cell once the kernel is idle; return the seconds until the proponent strip shows.

    On failure the page is saved as ``test-artifacts/<shot>_failed.png``.
    """
    try:
        page.wait_for_function(KERNEL_IDLE_JS, timeout=RENDER_TIMEOUT_MS)
        start = time.perf_counter()
        # Not awaited: the command's promise settles only when every cell has run.
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        page.wait_for_selector(".tfa-topk image", state="attached", timeout=RENDER_TIMEOUT_MS)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"{shot}_failed.png"))
        raise
    return time.perf_counter() - start


def _wait_idle(page) -> None:
    """Wait until no cell is queued or running (the prompt of each shows a number)."""
    page.wait_for_function(
        "() => !Array.from(document.querySelectorAll('.jp-InputPrompt'))"
        ".some(p => p.innerText.includes('*'))",
        timeout=RENDER_TIMEOUT_MS,
    )


@pytest.fixture(scope="module")
def lab(jupyter):
    """Yield JupyterLab (file browser open, narrow output) with the explorer notebook run."""
    server, browser = jupyter
    page = browser.new_page(viewport=LAB_VIEWPORT)
    _open(page, server.page_url("lab", "lab.ipynb"))
    seconds = _run_all(page, "jupyterlab")
    _wait_idle(page)
    report_latency(f"JupyterLab 4: explorer notebook run to the proponent strip in {seconds:.1f} s")
    yield page
    page.close()


def test_jupyterlab_runs_the_explorer_without_errors_or_warning_boxes(lab):
    assert lab.locator(".jp-SideBar .lm-TabBar-tab.lm-mod-current").count() >= 1, (
        "the file browser (a left side panel) should be open"
    )
    stderr = lab.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert stderr.count() == 0, stderr.all_inner_texts()
    assert lab.locator(".jp-OutputArea-output[data-mime-type*='error']").count() == 0
    text = lab.inner_text(".jp-Notebook")
    assert "Error displaying widget" not in text and "Predicting test images" not in text
    assert signature(lab)["error"].strip() == ""


def test_jupyterlab_gallery_click_updates_the_proponent_strip(lab):
    before = signature(lab)
    click_tile(lab, "tfa-gallery", 5)
    seconds = wait_changed(lab, before, ("caption", "test", "topk"))
    after = signature(lab)
    assert after["error"].strip() == ""
    report_latency(f"JupyterLab 4: gallery click to new proponents {seconds:.2f} s")


def test_jupyterlab_narrow_output_cuts_nothing_off(lab):
    lab.locator(".tfa-explorer").first.scroll_into_view_if_needed()
    found = lab.evaluate(PARTS_JS)
    lab.screenshot(path=str(ARTIFACTS / "jupyterlab_narrow.png"), full_page=True)
    left, _, right, _ = found["area"]
    low, high = NARROW_OUTPUT_PX
    assert low <= right - left <= high, f"output area {right - left:.0f} px wide"
    assert found["cutButtons"] == [], "button labels cut off"
    assert {"gallery", "test", "strip", "controls"} <= set(found["parts"])
    if not found["scrolls"]:
        for name, (a, _, b, _) in found["parts"].items():
            assert a >= left - 0.5 and b <= right + 0.5, (name, (a, b), (left, right))
    for name, (a, _, b, _) in found["parts"].items():
        if name.startswith("slider"):
            assert b - a >= 60, f"{name} shrank to {b - a:.0f} px: a bare handle"
    # One column: the strip, the main result, comes below the gallery, using the whole width.
    gallery, strip = found["parts"]["gallery"], found["parts"]["strip"]
    assert strip[1] >= gallery[3] - 0.5


def test_jupyterlab_dark_theme_reaches_the_figures(lab):
    assert all(c != "rgba(0,0,0,0)" for c in lab.evaluate(PAPER_JS)), "light theme: white"
    lab.evaluate(
        "() => window.jupyterapp.commands.execute('apputils:change-theme',"
        " {theme: 'JupyterLab Dark'})"
    )
    try:
        lab.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false' && (" + PAPER_JS + ")()"
            ".every(c => c === 'rgba(0,0,0,0)')",
            timeout=UPDATE_TIMEOUT_MS,
        )
        # Every title light on the dark background (they stayed grey: the light theme's colour).
        lab.wait_for_function(
            "() => (" + TITLE_FILLS_JS + ")().every(f => f.match(/\\d+/g).slice(0, 3)"
            ".every(c => Number(c) > 180))",
            timeout=UPDATE_TIMEOUT_MS,
        )
        lab.screenshot(path=str(ARTIFACTS / "jupyterlab_dark.png"))
    finally:
        lab.evaluate(
            "() => window.jupyterapp.commands.execute('apputils:change-theme',"
            " {theme: 'JupyterLab Light'})"
        )
    lab.wait_for_function(
        "() => (" + PAPER_JS + ")().every(c => c !== 'rgba(0,0,0,0)')",
        timeout=UPDATE_TIMEOUT_MS,
    )


def test_jupyterlab_reload_restores_the_widgets_from_the_running_kernel(lab, jupyter):
    server, _ = jupyter
    before = signature(lab)
    lab.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")
    saved, deadline = server.root / "lab.ipynb", time.monotonic() + 60
    while WIDGET_VIEW not in saved.read_text():  # the outputs, with the explorer's view, on disk
        assert time.monotonic() < deadline, "the notebook was not saved with its outputs"
        time.sleep(0.5)
    start = time.perf_counter()
    lab.reload(timeout=RENDER_TIMEOUT_MS)
    try:
        lab.wait_for_function(APP_READY_JS, timeout=RENDER_TIMEOUT_MS)
        lab.wait_for_selector(".tfa-topk image", state="attached", timeout=RENDER_TIMEOUT_MS)
    except Exception:
        lab.screenshot(path=str(ARTIFACTS / "jupyterlab_reload_failed.png"), full_page=True)
        raise
    seconds = time.perf_counter() - start
    after = signature(lab)
    assert after["caption"] == before["caption"] and after["topk"] == before["topk"]
    prompts = lab.locator(".jp-InputPrompt").all_inner_texts()
    report_latency(
        f"JupyterLab 4: page reloaded, explorer restored from the kernel in {seconds:.1f} s"
        f" (no cell run again; prompts {prompts})"
    )
    click_tile(lab, "tfa-gallery", 6)  # and it is live, not a picture of the old state
    wait_changed(lab, after, ("caption", "topk"))


def test_notebook7_top_k_slider_answers_the_arrow_keys(jupyter):
    """The handle keeps its keys: Notebook 7's command-mode shortcuts (selectors ending in
    ":focus") took ArrowRight before the slider saw it, until the focused element was marked."""
    server, browser = jupyter
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        _open(page, server.page_url("notebook", "nb7.ipynb"))
        seconds = _run_all(page, "notebook7")
        _wait_idle(page)
        report_latency(
            f"Notebook 7: explorer notebook run to the proponent strip in {seconds:.1f} s"
        )
        assert signature(page)["error"].strip() == ""
        handle = page.locator(".tfa-k .noUi-handle")
        handle.scroll_into_view_if_needed()
        before = signature(page)
        k = int(before["caption"].split("top ")[1].split()[0])
        handle.click()
        page.keyboard.press("ArrowRight")
        try:
            wait_changed(page, before, ("caption", "topk"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "notebook7_keys_failed.png"))
            raise
        assert f"top {k + 1} " in signature(page)["caption"]
        before = signature(page)
        page.keyboard.press("ArrowLeft")
        wait_changed(page, before, ("caption",))
        assert f"top {k} " in signature(page)["caption"]
        page.screenshot(path=str(ARTIFACTS / "notebook7.png"))
    finally:
        page.close()
