"""Rows of evaluation runs saved as JSON (``benchmarks/evaluate.py --json``), pooled.

A long evaluation runs as one process per seed (and per group of measures), each writing its rows
to a file; `pool_runs` reads them back as if they came from one run, so that the tables and plots
of `tfa_widgets.eval.summary` and `tfa_widgets.eval.plots` can be made from them (the notebook
`notebooks/evaluation.ipynb` shows the committed runs this way).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tfa_widgets.core.errors import InputError


@dataclass
class SavedRuns:
    """Rows of several saved runs, pooled.

    Parameters
    ----------
    rows : list of dict
        The map measures' rows (`tfa_widgets.eval.report.evaluate`).
    image_rows : list of dict
        The training-image rows (``kind`` ``"attribution"`` or ``"patch"``).
    tests : dict
        Seed (as a string, as JSON keeps it) to the test images drawn for it.
    """

    rows: list[dict] = field(default_factory=list)
    image_rows: list[dict] = field(default_factory=list)
    tests: dict[str, list[int]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict]:
        """Return the training-image rows of one kind.

        Parameters
        ----------
        kind : str
            ``"attribution"`` or ``"patch"``.

        Returns
        -------
        list of dict
            Those rows, in the order they were read.
        """
        return [r for r in self.image_rows if r["kind"] == kind]


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "value"}, sort_keys=True)


def pool_runs(paths: Iterable[str | Path]) -> SavedRuns:
    """Return the rows of the runs saved in ``paths``, pooled.

    A row that two runs share (same measure, method, seed, test image; for instance the random
    attributor of one seed measured by two runs) counts once: the later file's value is kept.

    Parameters
    ----------
    paths : iterable of str or Path
        Files written by ``benchmarks/evaluate.py --json``.

    Returns
    -------
    SavedRuns
        The pooled rows and the test images of every seed.

    Raises
    ------
    InputError
        If no file is given, or a file is not such a run (the file is named).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no saved evaluation runs to pool")
    rows: dict[str, dict] = {}
    image_rows: dict[str, dict] = {}
    tests: dict[str, list[int]] = {}
    for path in paths:
        try:
            payload = json.loads(path.read_text())
            parts = ((payload["rows"], rows), (payload["training_image_rows"], image_rows))
            drawn = payload["tests"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path} is not a saved evaluation run ({error!r})") from error
        for part, pooled in parts:
            for row in part:
                pooled[_key(row)] = row
        for seed, chosen in drawn.items():
            tests[str(seed)] = sorted(set(tests.get(str(seed), [])) | set(chosen))
    return SavedRuns(list(rows.values()), list(image_rows.values()), tests)
