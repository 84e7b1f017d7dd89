"""Saved evaluation runs pooled back into one set of rows (`tfa_widgets.eval.saved`)."""

import json

import pytest

from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.saved import pool_runs
from tfa_widgets.eval.summary import summarise


def _row(measure, method, seed, value, kind=None):
    row = {"measure": measure, "method": method, "seed": seed, "test_index": -1, "value": value}
    return row | ({"kind": kind, "scorer": method} if kind else {})


def _save(path, seed, rows, image_rows):
    payload = {"tests": {str(seed): [seed, seed + 10]}, "rows": rows}
    path.write_text(json.dumps(payload | {"training_image_rows": image_rows}))
    return path


def test_runs_of_different_seeds_are_pooled(tmp_path):
    first = _save(
        tmp_path / "s0.json", 0, [_row("insertion@5", "tfa", 0, 1.0)],
        [_row("shortcut AP", "grad_cos", 0, 0.9, "attribution")],
    )  # fmt: skip
    second = _save(
        tmp_path / "s1.json", 1, [_row("insertion@5", "tfa", 1, 3.0)],
        [_row("shortcut AP", "grad_cos", 1, 0.7, "attribution"),
         _row("TFA mass on patch", "grad_cos", 1, 0.1, "patch")],
    )  # fmt: skip
    saved = pool_runs([first, str(second)])
    assert saved.tests == {"0": [0, 10], "1": [1, 11]}
    assert [r["value"] for r in saved.rows] == [1.0, 3.0]
    (summary,) = summarise(saved.of_kind("attribution"))
    assert summary.n == 2 and summary.mean == pytest.approx(0.8)
    assert [r["measure"] for r in saved.of_kind("patch")] == ["TFA mass on patch"]


def test_a_row_two_runs_share_counts_once(tmp_path):
    shared = _row("shortcut AP", "random", 0, 0.1, "attribution")
    first = _save(
        tmp_path / "a.json", 0, [], [shared, _row("LDS", "grad_cos", 0, 0.2, "attribution")]
    )
    second = _save(tmp_path / "b.json", 0, [], [shared | {"value": 0.3}])
    saved = pool_runs([first, second])
    values = {r["measure"] + r["method"]: r["value"] for r in saved.image_rows}
    assert values == {"shortcut APrandom": 0.3, "LDSgrad_cos": 0.2}


def test_bad_files_are_named(tmp_path):
    with pytest.raises(InputError, match="no saved"):
        pool_runs([])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="broken.json"):
        pool_runs([broken])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(InputError, match="other.json"):
        pool_runs([other])
    with pytest.raises(InputError, match="missing.json"):
        pool_runs([tmp_path / "missing.json"])
