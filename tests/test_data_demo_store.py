"""The generated demo data kept on disk: read back identical, keyed by seed and settings, and a
broken file generated again after a warning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tfa_widgets.data import DemoConfig, generate_demo
from tfa_widgets.data.demo_store import demo_data_path, load_demo_data

SMALL = DemoConfig(
    n_train=240, n_test=90, n_patched_test=8, flip_groups=1, two_object_groups=1, train_copies=3
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
