"""The explorer served by Voila, driven in headless chromium: clicks, controls, errors, layout.

One Voila server is shared by the module; one tall page serves the interaction tests, and new
pages at laptop sizes (1440x900, 1280x800) and at a narrow width check the layout: the selected
test image and its top-k inside the screen, nothing overlapping or cut off. Screenshots and the
measured latencies (first render, clicks, each view) go to ``test-artifacts/``. Set
``TFA_EXPLORER_NOTEBOOK`` to serve another notebook that displays an ``Explorer`` (the default
is ``notebooks/explorer.ipynb`` on the demo). Without chromium or playwright the tests skip,
unless ``TFA_REQUIRE_BROWSER=1``, where they fail.
"""

from __future__ import annotations

import os
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
    wait_changed,
)


def voila_command(notebook: Path, port: int) -> list[str]:
    """Return the command line serving ``notebook`` with Voila on 127.0.0.1:``port``."""
    voila = Path(sys.executable).with_name("voila")
    program = [str(voila)] if voila.exists() else [sys.executable, "-m", "voila"]
    return [
        *program,
        str(notebook),
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        "--show_tracebacks=True",
    ]


class VoilaServer:
    """A Voila subprocess serving one notebook; a context manager that always stops it."""

    def __init__(self, notebook: Path, log_path: Path, timeout_s: float = 60.0) -> None:
        self.notebook, self.log_path, self.timeout_s = Path(notebook), Path(log_path), timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VoilaServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            voila_command(self.notebook, self.port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.notebook.parent,
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"voila exited early; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "api/status", timeout=2):
                    return self
            except urllib.error.HTTPError:  # any HTTP answer means the server is up
                return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise TimeoutError(f"voila did not answer within {self.timeout_s} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


ROOT = Path(__file__).resolve().parents[1]
RENDER_TIMEOUT_MS = 240_000
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(request):
    """Yield a fresh Voila server showing the explorer notebook, and a chromium to visit it."""
    require_browser()
    from playwright.sync_api import sync_playwright

    notebook = os.environ.get("TFA_EXPLORER_NOTEBOOK")
    if notebook is None:
        notebook = ROOT / "notebooks" / "explorer.ipynb"
        request.getfixturevalue("demo_engine").build_index()  # trained and indexed on disk first
    ARTIFACTS.mkdir(exist_ok=True)
    with VoilaServer(Path(notebook), ARTIFACTS / "voila.log") as voila, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield voila, browser
        finally:
            browser.close()


def open_explorer(server, width: int, height: int):
    """Return a new page of ``width x height`` showing the explorer once its first view is drawn."""
    voila, browser = server
    page = browser.new_page(viewport={"width": width, "height": height})
    start = time.perf_counter()
    page.goto(voila.url, timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(".tfa-topk image", state="attached", timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(".tfa-gallery .nsewdrag", state="attached")
    report_latency(f"first render at {width}x{height}: {time.perf_counter() - start:.2f} s")
    return page


@pytest.fixture(scope="module")
def app(server):
    """Yield a tall chromium page showing the explorer served by the module's Voila server."""
    page = open_explorer(server, 1400, 1800)
    page.screenshot(path=str(ARTIFACTS / "explorer_initial.png"), full_page=True)
    yield page
    page.close()


def test_click_test_image_updates_selection_topk_and_maps(app):
    page = app
    latencies, statuses = [], []
    for tile in (3, 4, 3):  # a new image, another new one, then back to a cached one
        before = signature(page)
        click_tile(page, "tfa-gallery", tile)
        latencies.append(wait_changed(page, before, ("caption", "test", "topk", "gallery")))
        after = signature(page)
        statuses.append(after["status"].rsplit("(", 1)[-1].rstrip(")"))
        assert after["error"].strip() == "", after["error"]
        assert after["caption"] != before["caption"]
        assert after["topk"] != before["topk"], "the top-k images did not change"
        assert after["test"] != before["test"], "the selected test image did not change"
    page.screenshot(path=str(ARTIFACTS / "explorer_after_click.png"), full_page=True)
    report_latency(
        "click-to-update (s): first new image {:.2f}, second new image {:.2f}, "
        "back to a cached image {:.2f}".format(*latencies)
        + f"; engine time as reported by the app: {', '.join(statuses)}"
    )
    assert max(latencies) < 30.0  # only catches hangs: the machine may be shared and busy


def test_clicking_a_training_image_shows_it_large(app):
    page = app
    before = signature(page)
    click_tile(page, "tfa-topk", 1)
    wait_changed(page, before, ("detail",))
    assert "rank" in page.inner_text(".tfa-meta")
    assert page.inner_text(".tfa-meta").split("rank")[1].strip().startswith("2")


def test_k_slider_changes_topk_panel(app):
    page = app
    before = signature(page)
    k = int(before["caption"].split("top ")[1].split()[0])
    page.focus(".tfa-k .noUi-handle")
    page.keyboard.press("ArrowRight")
    elapsed = wait_changed(page, before, ("caption", "topk"))
    assert f"top {k + 1} " in signature(page)["caption"]
    before = signature(page)
    page.keyboard.press("ArrowLeft")
    back = wait_changed(page, before, ("caption", "topk"))
    assert f"top {k} " in signature(page)["caption"]
    report_latency(f"k slider: {k}->{k + 1} {elapsed:.2f} s, back (cached) {back:.2f} s")
    page.screenshot(path=str(ARTIFACTS / "explorer_after_k.png"), full_page=True)


def test_no_finished_progress_bar_or_broken_widget_stays_on_the_page(app):
    text = app.inner_text("body")
    assert "Predicting test images" not in text, "a finished progress bar stayed"
    assert "Error displaying widget" not in text


def test_download_button_saves_a_self_contained_page(app, tmp_path):
    with app.expect_download(timeout=UPDATE_TIMEOUT_MS) as download:
        app.locator(".tfa-download-button", has_text="view (HTML)").click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    page = path.read_text()
    assert path.suffix == ".html" and 'src="https://cdn.plot.ly' not in page
    assert page.count('class="tfa-figure"') == 4 and len(page) > 1_000_000  # plotly.js inside
    with app.expect_download(timeout=UPDATE_TIMEOUT_MS) as download:
        app.locator(".tfa-download-button", has_text="ranking (CSV)").click()
    assert download.value.suggested_filename.endswith(".csv")


def test_controls_keep_their_keys_from_notebook_shortcuts(app):
    marked = app.evaluate(
        "() => document.querySelector('.tfa-controls').getAttribute('data-lm-suppress-shortcuts')"
    )
    assert marked == "true"  # Lumino (JupyterLab, Notebook 7) then leaves the arrow keys alone
    app.focus(".tfa-k .noUi-handle")  # and the focused element itself, which ":focus" matches
    focused = "() => document.activeElement.getAttribute('data-lm-suppress-shortcuts')"
    assert app.evaluate(focused) == "true"


def test_reference_map_switch_redraws_the_maps_and_names_them(app):
    page = app
    test_href = "() => document.querySelector('.tfa-test .hm image').getAttribute('href')"
    latencies = []
    for label, caption in [
        ("saliency", "reference map saliency"),
        ("Integrated Gradients", "reference map Integrated Gradients"),
        ("Grad-CAM", "Grad-CAM layer"),
    ]:
        before, shown = signature(page), page.evaluate(test_href)
        start = time.perf_counter()
        page.locator(".tfa-reference button", has_text=label).click()
        page.wait_for_function(
            "([text, href]) => document.querySelector('.tfa-caption').innerText.includes(text)"
            " && document.querySelector('.tfa-test .hm image').getAttribute('href') !== href",
            arg=[caption, shown],
            timeout=UPDATE_TIMEOUT_MS,
        )
        latencies.append(f"{label} {time.perf_counter() - start:.2f} s")
        after = signature(page)
        assert after["error"].strip() == "" and after["topk"] == before["topk"]
    report_latency("reference map switch: " + ", ".join(latencies))


def test_smoothing_toggle_changes_maps(app):
    page = app
    before = signature(page)
    page.click(".tfa-smooth input[type=checkbox]")
    elapsed = wait_changed(page, before, ("caption", "heat"))
    assert "SmoothGrad" in signature(page)["caption"]
    report_latency(f"SmoothGrad on: {elapsed:.2f} s")
    page.screenshot(path=str(ARTIFACTS / "explorer_smoothgrad.png"), full_page=True)
    before = signature(page)
    page.click(".tfa-smooth input[type=checkbox]")
    wait_changed(page, before, ("caption",))
    assert "SmoothGrad" not in signature(page)["caption"]


def test_bad_layer_error_shows_beside_its_field_and_clicks_keep_working(app):
    page = app
    field = page.locator(".tfa-layer input")
    field.fill("no_such_layer")
    field.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('.tfa-layer-error') || {}).innerText"
        ".includes('no_such_layer')",
        timeout=UPDATE_TIMEOUT_MS,
    )
    page.screenshot(path=str(ARTIFACTS / "explorer_error.png"), full_page=True)
    near = page.evaluate(
        """() => {
      const a = document.querySelector('.tfa-layer').getBoundingClientRect();
      const b = document.querySelector('.tfa-layer-error .tfa-error-box').getBoundingClientRect();
      const dx = Math.max(0, b.left - a.right, a.left - b.right);
      const dy = Math.max(0, b.top - a.bottom, a.top - b.bottom);
      return Math.hypot(dx, dy) < 40;
    }"""
    )
    assert near, "the layer error is not next to the layer field"
    before = signature(page)  # the bad name stays in the field: a gallery click still works
    click_tile(page, "tfa-gallery", 4)
    wait_changed(page, before, ("caption", "topk"))
    after = signature(page)
    assert "no_such_layer" in after["error"] and "Grad-CAM layer" in after["caption"]
    field.fill("")
    field.press("Enter")
    page.wait_for_function(
        "() => !(document.querySelector('.tfa-layer-error') || {}).innerText",
        timeout=UPDATE_TIMEOUT_MS,
    )


LAYOUT_JS = """() => {
  const box = (el) => { const r = el.getBoundingClientRect();
                        return [r.left, r.top, r.right, r.bottom]; };
  const first = (sel) => { const el = document.querySelector(sel); return el ? box(el) : null; };
  const all = (sel) => Array.from(document.querySelectorAll(sel)).map(box);
  return {test: first('.tfa-test .main-svg'), strip: first('.tfa-topk .main-svg'),
          colorbars: all('.tfa-topk .colorbar'), titles: all('.tfa-topk .annotation'),
          k: (document.querySelector('.tfa-caption') || {}).innerText || '',
          width: window.innerWidth, height: window.innerHeight,
          scrollWidth: document.documentElement.scrollWidth};
}"""


def _inside(box, width: float, height: float) -> bool:
    left, top, right, bottom = box
    return left >= -0.5 and top >= -0.5 and right <= width + 0.5 and bottom <= height + 0.5


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5


def _set_k(page, k: int) -> None:
    before = signature(page)
    readout = page.locator(".tfa-k .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(k))
    page.keyboard.press("Enter")
    if f"top {k} " not in before["caption"] and not (
        k == 1 and "top proponent" in before["caption"]
    ):
        wait_changed(page, before, ("caption",))


def _set_baseline(page, on: bool) -> None:
    box = page.locator(".tfa-baseline input[type=checkbox]")
    if box.is_checked() != on:
        before = signature(page)
        box.click()
        wait_changed(page, before, ("topk",))


@pytest.mark.parametrize("width, height", [(1440, 900), (1280, 800)])
def test_laptop_screen_shows_the_test_image_and_its_proponents_together(server, width, height):
    page = open_explorer(server, width, height)
    try:
        for baseline in (False, True):
            _set_baseline(page, baseline)
            for k in (1, 8, 16, 32):
                _set_k(page, k)
                page.wait_for_timeout(300)  # let Plotly finish the redraw it was sent
                shot = ARTIFACTS / f"layout_{width}x{height}_k{k}_baseline{int(baseline)}.png"
                page.screenshot(path=str(shot))
                boxes = page.evaluate(LAYOUT_JS)
                where = f"{width}x{height}, k={k}, baseline {'on' if baseline else 'off'}"
                for name in ("test", "strip"):
                    assert _inside(boxes[name], width, height), (where, name, boxes[name])
                assert not _overlap(boxes["test"], boxes["strip"]), where
                assert len(boxes["colorbars"]) == 1 + baseline, where
                for bar in boxes["colorbars"]:
                    assert _inside(bar, width, height), (where, "colour bar", bar)
                titles = boxes["titles"]
                assert len(titles) == k, where
                for i, a in enumerate(titles):
                    assert _inside(a, width, height), (where, "title", i)
                    for j in range(i):
                        assert not _overlap(a, titles[j]), (where, "titles collide", i, j)
    finally:
        page.close()


def test_narrow_column_reflows_without_cutting_anything_off(server):
    width = 600  # about JupyterLab's output area with the file browser open
    page = open_explorer(server, width, 1400)
    try:
        page.screenshot(path=str(ARTIFACTS / "layout_narrow_600.png"), full_page=True)
        boxes = page.evaluate(LAYOUT_JS)
        assert boxes["scrollWidth"] <= width + 1, "the page scrolls sideways: something is cut"
        for name in ("test", "strip"):
            left, _, right, _ = boxes[name]
            assert left >= 0 and right <= width + 0.5, (name, boxes[name])
        gallery = page.evaluate(
            "() => { const r = document.querySelector('.tfa-gallery .main-svg')"
            ".getBoundingClientRect(); return [r.left, r.right]; }"
        )
        assert gallery[0] >= 0 and gallery[1] <= width + 0.5
    finally:
        page.close()


# What a theme's style sheet does: set the text colour variables the widgets' CSS reads.
SET_TEXT_COLOUR = (
    "for (const v of ['--jp-widgets-color', '--jp-content-font-color1', '--jp-ui-font-color1'])"
    " document.body.style.setProperty(v, "
)


def test_figures_follow_a_dark_theme(app):
    """Background and titles follow the theme, also when its style sheet arrives after its mark
    on <body> (the titles stayed grey: drawn in the light theme's text colour)."""
    page = app
    paper = (
        "() => Array.from(document.querySelectorAll('.tfa-topk .js-plotly-plot, "
        ".tfa-probs .js-plotly-plot')).map(gd => gd._fullLayout.paper_bgcolor)"
    )
    assert all(
        c in ("white", "#fff", "#ffffff", "rgb(255, 255, 255)") for c in page.evaluate(paper)
    )
    light_titles = page.evaluate(TITLE_FILLS_JS)
    assert len(light_titles) >= 4 and "rgb(240,240,240)" not in light_titles
    page.evaluate("() => { document.body.dataset.jpThemeLight = 'false'; }")
    try:
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.tfa-topk .js-plotly-plot'))"
            ".every(gd => gd._fullLayout.paper_bgcolor.replace(/\\s/g, '') === 'rgba(0,0,0,0)')",
            timeout=UPDATE_TIMEOUT_MS,
        )
        page.wait_for_timeout(300)
        # Now the theme's style sheet: the page's text turns light, and so must every title.
        page.evaluate(f"() => {{ {SET_TEXT_COLOUR}'rgb(240, 240, 240)'); }}")
        page.wait_for_function(
            "() => (" + TITLE_FILLS_JS + ")().every(f => f === 'rgb(240,240,240)')",
            timeout=UPDATE_TIMEOUT_MS,
        )
        page.screenshot(path=str(ARTIFACTS / "explorer_dark.png"))
    finally:
        page.evaluate(
            f"() => {{ delete document.body.dataset.jpThemeLight; {SET_TEXT_COLOUR}''); }}"
        )
    page.wait_for_function(
        "() => (" + TITLE_FILLS_JS + ")().every(f => f !== 'rgb(240,240,240)')",
        timeout=UPDATE_TIMEOUT_MS,
    )


HAS_DATA_JS = """(cls) => { const gd = document.querySelector(`.${cls} .js-plotly-plot`);
  return !!(gd && gd.data && gd.data.length && gd._fullLayout && gd._fullLayout.width); }"""


def test_training_set_tabs_open_and_report_their_latency(app):
    page = app
    latencies = []
    for tab, figure in [
        ("Score distribution", "tfa-distribution"),
        ("Compare scorers", "tfa-compare-right"),
        ("Map", "tfa-map"),
        ("Audit", "tfa-audit-self"),
    ]:
        start = time.perf_counter()
        page.locator(".tfa-training-set .lm-TabBar-tab", has_text=tab).click()
        page.wait_for_function(HAS_DATA_JS, arg=figure, timeout=UPDATE_TIMEOUT_MS)
        latencies.append(f"{tab} {time.perf_counter() - start:.2f} s")
        assert signature(page)["error"].strip() == ""
    start = time.perf_counter()
    page.locator(".tfa-training-set button", has_text="Run audit").click()
    page.wait_for_function(HAS_DATA_JS, arg="tfa-audit-frequent", timeout=4 * UPDATE_TIMEOUT_MS)
    latencies.append(f"audit of all mistakes {time.perf_counter() - start:.2f} s")
    page.screenshot(path=str(ARTIFACTS / "explorer_audit.png"), full_page=True)
    report_latency("training-set views (first open): " + ", ".join(latencies))
