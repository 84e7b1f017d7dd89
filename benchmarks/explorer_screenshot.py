"""Take the README's screenshot: the explorer on the demo, served by Voila, on a 1440x900 screen.

Serves ``notebooks/explorer.ipynb`` as ``tfa-widgets demo`` does (building the demo first if it
is not cached), opens it in headless chromium at 1440x900, waits until the proponent strip is
drawn and saves the visible screen (not the whole page) as a PNG:

    python benchmarks/explorer_screenshot.py [--out docs/explorer.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from browser_support import free_port, launch_chromium  # noqa: E402

from tfa_widgets.cli import find_explorer_notebook, prepare_demo, voila_command  # noqa: E402

SCREEN = {"width": 1440, "height": 900}
TIMEOUT_S = 600


def wait_for_server(url: str, process: subprocess.Popen) -> None:
    """Return once ``url`` answers (any HTTP status); raise if the server exits or never does."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("voila exited before answering")
        try:
            with urllib.request.urlopen(url + "voila/static/", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no answer from {url} within {TIMEOUT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "explorer.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    prepare_demo()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = voila_command(find_explorer_notebook(), "127.0.0.1", port)
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as voila:
        try:
            wait_for_server(url, voila)
            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                page = browser.new_page(viewport=SCREEN)
                page.goto(url, timeout=TIMEOUT_S * 1000)
                page.wait_for_selector(
                    ".tfa-topk image", state="attached", timeout=TIMEOUT_S * 1000
                )
                page.wait_for_selector(".tfa-test image", state="attached")
                page.wait_for_timeout(1000)  # Plotly's last redraw
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            voila.terminate()
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
