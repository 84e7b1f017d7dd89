"""Memory of one explorer kernel on the demo: resident (RSS), proportional (PSS) and unique (USS).

Starts a real Jupyter kernel, runs the explorer notebook's code in it step by step and prints the
kernel process's memory after each step, from ``/proc/<pid>/smaps_rollup`` (Linux only):

- RSS: every page the kernel touches, shared libraries counted in full;
- PSS: shared pages divided among the processes that map them: the kernel's own share;
- USS: pages no other process maps: what ending the kernel gives back;
- PSS split into anonymous memory (tensors, Python objects) and file-backed pages (mostly
  torch's shared libraries, which a CPU-only torch build makes smaller).

One kernel alone maps torch's libraries by itself, so its PSS is close to its RSS; with several
kernels (several pages) the file-backed part is shared. Run with the demo already built (``make
demo`` or ``tfa-widgets demo --no-serve``), otherwise the first step trains it:

    TFA_CACHE_DIR=/tmp/tfa-cache python benchmarks/kernel_memory.py [--clicks 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfa_widgets.cli import EXPLORER_CODE  # noqa: E402

# Kept in a name, and displayed as in the notebook; the first view is computed before the cell
# returns (in the notebook it comes from a background thread), so the clicks below are explained
# one after the other instead of queueing behind it.
SHOWN_APP = "app = Explorer.demo(background=False)\napp"


def smaps_rollup(pid: int) -> dict[str, float]:
    """Return the fields of ``/proc/<pid>/smaps_rollup`` in MiB, plus ``Uss``."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, rest = line.split(":", 1)
        values[name] = int(rest.split()[0]) / 1024
    values["Uss"] = values["Private_Clean"] + values["Private_Dirty"]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20, help="test images explained in turn")
    args = parser.parse_args()

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    manager, client = start_new_kernel(kernel_name="python3", env=env, cwd=str(root))
    pid = manager.provisioner.process.pid
    steps = [
        ("fresh kernel", "pass"),
        ("import torch", "import torch"),
        ("explorer notebook run", EXPLORER_CODE.replace("Explorer.demo()", SHOWN_APP)),
        (
            f"{args.clicks} test images explained",
            textwrap.dedent(f"""\
                for i in range({args.clicks}):
                    app.select_test(i)
                """),
        ),
    ]
    columns = ("RSS", "PSS", "USS", "PSS anon", "PSS file")
    print(f"{'step':<32}" + "".join(f"{c:>10}" for c in columns))
    try:
        for name, code in steps:
            reply = client.execute_interactive(code, timeout=1800, output_hook=lambda msg: None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"{name}: {reply['content'].get('evalue')}")
            m = smaps_rollup(pid)
            row = (m["Rss"], m["Pss"], m["Uss"], m["Pss_Anon"], m["Pss_File"])
            print(f"{name:<32}" + "".join(f"{v:>9.0f}M" for v in row), flush=True)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
