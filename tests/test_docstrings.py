"""Every public name has a complete NumPy-style docstring and a place in the API reference.

The check itself lives in ``docs/hooks/public_api.py`` (standard library only), shared with the
docs build, which fails on the same problems.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tfa_widgets import InputError

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load_checker():
    spec = importlib.util.spec_from_file_location("public_api", DOCS / "hooks" / "public_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


public_api = _load_checker()


def test_every_public_name_has_a_complete_docstring():
    problems = public_api.problems()
    assert not problems, "incomplete docstrings:\n" + "\n".join(map(str, problems))


def test_every_public_name_is_in_the_api_reference():
    missing = public_api.unreferenced(DOCS / "api")
    assert not missing, f"add these to a page of docs/api/: {missing}"


def test_the_public_names_include_the_main_entry_points():
    names = set(public_api.exported_names())
    for expected in (
        "tfa_widgets.core.engine.TFAEngine",
        "tfa_widgets.core.explanation.Explanation",
        "tfa_widgets.core.settings.SmoothGrad",
        "tfa_widgets.core.settings.IndexSettings",
        "tfa_widgets.core.query.Query",
        "tfa_widgets.core.errors.TFAError",
        "tfa_widgets.widgets.explorer.Explorer",
        "tfa_widgets.eval.report.evaluate",
        "tfa_widgets.data.demo.load_demo",
    ):
        assert expected in names


# The checker on examples whose problems are known, so that the tests above can fail.


def _undocumented(a, b):
    return a + b


def _summary_only(a: int, b: int) -> int:
    """Return the sum."""
    return a + b


def _complete(a: int, b: int = 0) -> int:
    """Return the sum of two numbers.

    Parameters
    ----------
    a, b : int
        The numbers.

    Returns
    -------
    int
        ``a + b``.

    Raises
    ------
    InputError
        When ``a`` is negative.
    """
    if a < 0:
        raise InputError(f"a must not be negative, got {a}")
    return a + b


def _raises_undocumented(a: int) -> None:
    """Check ``a``.

    Parameters
    ----------
    a : int
        The number.
    """
    if a < 0:
        raise ValueError(a)


class _Settings:
    """Settings.

    Parameters
    ----------
    size : int
        How many.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size, self.name = size, name

    @property
    def half(self) -> int:
        return self.size // 2


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_undocumented, ["no docstring"]),
        (_summary_only, ["parameters not documented: a, b", "no Returns section"]),
        (_complete, []),
        (_raises_undocumented, ["Raises does not name ValueError"]),
        (_Settings, ["parameters not documented: name"]),
        (_Settings.half, ["no docstring"]),
    ],
)
def test_the_checker_finds_each_kind_of_problem(obj, expected):
    assert [p.message for p in public_api.check("example", obj)] == expected


def test_sections_are_split_by_numpy_headers():
    parts = public_api.sections(_complete.__doc__)
    assert set(parts) == {"", "Parameters", "Returns", "Raises"}
    assert public_api.documented_names(parts["Parameters"]) == {"a", "b"}
