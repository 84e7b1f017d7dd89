"""The generated demo data kept on disk: read back identical, keyed by seed and settings, and a
broken file generated again after a warning."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from tfa_widgets.data import DemoConfig, generate_demo
from tfa_widgets.data.demo_store import demo_data_path, load_demo_data

SMALL = DemoConfig(
    n_train=240, n_test=90, n_patched_test=8, flip_groups=1, two_object_groups=1, train_copies=3
)

TINY = DemoConfig(
    n_train=60,
    n_test=30,
    n_patched_test=2,
    flip_groups=1,
    two_object_groups=1,
    train_copies=2,
    test_copies=1,
)


def _assert_same(got, expected) -> None:
    for a, b in zip(got[:2], expected[:2], strict=True):
        assert a.fingerprint == b.fingerprint and a.name == b.name
        assert (a.images_uint8 == b.images_uint8).all() and torch.equal(a.labels, b.labels)
        assert torch.equal(a.masks, b.masks)
        assert [a.item_info(i) for i in range(len(a))] == [b.item_info(i) for i in range(len(b))]
        assert a.normalization == b.normalization
    meta, want = got[2], expected[2]
    for f in dataclasses.fields(want):
        x, y = getattr(meta, f.name), getattr(want, f.name)
        if isinstance(y, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_kept_demo_data_read_back_equal_to_generated(tmp_path):
    expected = generate_demo(3, SMALL)
    first = load_demo_data(3, SMALL, tmp_path)
    path = demo_data_path(tmp_path, 3, SMALL)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]
    _assert_same(first, expected)
    stamp = path.stat().st_mtime_ns
    again = load_demo_data(3, SMALL, tmp_path)
    assert path.stat().st_mtime_ns == stamp  # read, not written again
    _assert_same(again, expected)


def test_the_key_follows_seed_and_settings(tmp_path):
    path = demo_data_path(tmp_path, 3, SMALL)
    assert demo_data_path(tmp_path, 4, SMALL) != path
    assert demo_data_path(tmp_path, 3, dataclasses.replace(SMALL, patch_size=5)) != path
    assert demo_data_path(tmp_path, 3, dataclasses.replace(SMALL)) == path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_broken_file_is_generated_again_after_a_warning(tmp_path, damage):
    load_demo_data(3, SMALL, tmp_path)
    path = demo_data_path(tmp_path, 3, SMALL)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an npz file")
    with pytest.warns(UserWarning, match="unreadable"):
        got = load_demo_data(3, SMALL, tmp_path)
    _assert_same(got, generate_demo(3, SMALL))
    _assert_same(load_demo_data(3, SMALL, tmp_path), got)  # the file was written again


def test_the_explorer_kernel_loads_the_demo_without_torchvision_or_dynamo(tmp_path):
    """Importing torchvision pulls in torch._dynamo: seconds on every explorer kernel start,
    before the gallery shows.

    (Training imports it, through torch.optim, and so does the first explanation, through
    torch.func, in the background once the gallery shows; a kernel loads the trained demo.)
    """
    from tfa_widgets.data import load_demo
    from tfa_widgets.data.train import TrainConfig

    load_demo(1, tmp_path, progress=False, config=TINY, train_config=TrainConfig(epochs=8))
    code = (
        "import sys\n"
        "from tfa_widgets.widgets import Explorer\n"
        "from tfa_widgets.data import DemoConfig, load_demo\n"
        "from tfa_widgets.data.train import TrainConfig\n"
        f"config = {TINY!r}\n"
        "demo = load_demo(1, progress=False, config=config, train_config=TrainConfig(epochs=8))\n"
        "demo.engine(progress=False).build_index()\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    env = {**os.environ, "TFA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
