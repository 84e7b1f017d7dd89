"""What the browser tests share: the system chromium, its flags, a free port, and how to read and
click the explorer on a page (Voila, JupyterLab or Notebook 7 alike)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

UPDATE_TIMEOUT_MS = 60_000
# Screenshots, server logs and the latency report (``browser_latency.txt``) of the browser tests.
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

CHROMIUM = os.environ.get("TFA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def browser_missing_reason() -> str | None:
    """Return why browser tests cannot run here, or None when they can."""
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (set TFA_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    return None


def require_browser() -> None:
    """Skip the test without chromium or playwright; fail instead when TFA_REQUIRE_BROWSER=1."""
    reason = browser_missing_reason()
    if reason and os.environ.get("TFA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (TFA_REQUIRE_BROWSER=1) but {reason}")
    if reason:
        pytest.skip(reason)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a server process, killing it if it has not ended within 20 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def report_latency(line: str) -> None:
    """Append ``line`` to the browser-latency report and print it."""
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "browser_latency.txt", "a") as f:
        f.write(line + "\n")
    print(line)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_chromium(playwright):
    """Return a headless system chromium (Playwright gives it a fresh temporary profile)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


# The screen centre of tile i of an image grid (the figure's meta.grid says where tiles are).
TILE_CENTRE_JS = """([cls, i]) => {
  const root = document.querySelector(`.${cls}`);
  const gd = root.classList.contains('js-plotly-plot')
    ? root : root.querySelector('.js-plotly-plot');
  const g = gd._fullLayout.meta.grid;
  const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
  const cw = g.tile_w + 2 * g.pad, ch = g.band + g.tile_h + 2 * g.pad;
  const nrows = Math.max(1, Math.ceil(g.n / g.ncols));
  const r = Math.floor(i / g.ncols), c = i % g.ncols;
  const x = c * cw + g.pad + g.tile_w / 2, y = r * ch + g.band + g.pad + g.tile_h / 2;
  return [box.left + (x + 0.5) / (g.ncols * cw) * box.width,
          box.top + (y + 0.5) / (nrows * ch) * box.height, g.n];
}"""

# What the explorer shows: captions, errors and the images of each figure, to see them change.
SIGNATURE_JS = """() => {
  const href = (cls) => {
    const el = document.querySelector(`.${cls} image`);
    return el ? (el.getAttribute('href') || el.getAttribute('xlink:href') || '') : '';
  };
  const text = (cls) => (document.querySelector(`.${cls}`) || {}).innerText || '';
  const errors = Array.from(document.querySelectorAll('.tfa-error')).map(e => e.innerText);
  return {caption: text('tfa-caption'), status: text('tfa-status'), error: errors.join(''),
          gallery: href('tfa-gallery'), test: href('tfa-test'), topk: href('tfa-topk'),
          detail: href('tfa-detail'),
          heat: Array.from(document.querySelectorAll('.tfa-topk .hm image'))
                  .map(e => (e.getAttribute('href') || '').length).join(',')};
}"""


# The fill of every title, colour-bar title and tile title of the explorer's figures.
TITLE_FILLS_JS = """() => Array.from(document.querySelectorAll(
  '.tfa-test text, .tfa-probs text, .tfa-topk text, .tfa-detail text'))
  .filter(t => /title$/.test(t.getAttribute('class') || '')
               || t.classList.contains('annotation-text'))
  .map(t => getComputedStyle(t).fill.replace(/\\s/g, ''))"""


def signature(page) -> dict:
    """Return what the explorer on ``page`` shows now (see ``SIGNATURE_JS``)."""
    return page.evaluate(SIGNATURE_JS)


def wait_changed(page, before: dict, keys: tuple[str, ...]) -> float:
    """Wait until every entry ``keys`` of the signature differs from ``before``; return seconds."""
    start = time.perf_counter()
    page.wait_for_function(
        "([before, keys]) => { const now = (" + SIGNATURE_JS + ")();"
        " return keys.every(k => now[k] !== before[k]) && !now.status.includes('⏳'); }",
        arg=[before, list(keys)],
        timeout=UPDATE_TIMEOUT_MS,
        polling=20,
    )
    return time.perf_counter() - start


def click_tile(page, cls: str, i: int) -> None:
    """Click tile ``i`` of the image grid of class ``cls``, scrolled into view first."""
    page.locator(f".{cls}").first.scroll_into_view_if_needed()
    x, y, n = page.evaluate(TILE_CENTRE_JS, [cls, i])
    assert i < n, f"figure {cls} has only {n} tiles"
    page.mouse.move(x, y)
    page.wait_for_timeout(50)
    page.mouse.click(x, y)
