"""Summaries of evaluation rows: mean ± std per measure and method, paired wins, a text table."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from tfa_widgets.eval.baselines import SCORER_LABELS

HIGHER = "↑"
LOWER = "↓"


def direction(measure: str) -> str:
    """Return ``"↑"`` if higher is better for ``measure``, ``"↓"`` if lower, ``""`` if neither."""
    if measure.startswith(("insertion", "sanity", "retrain Δprob", "randomisation ρ")):
        return LOWER
    if measure.startswith(("deletion", "retrain Δloss", "pointing", "mass", "positive mass")):
        return HIGHER
    training_images = ("mislabelling", "shortcut AP", "identical class", "top-", "LDS", "cue found")
    if measure.startswith(training_images) or measure.endswith("mass on patch"):
        return HIGHER
    return ""


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of one measure for one method over ``n`` units."""

    measure: str
    method: str
    mean: float
    std: float
    n: int

    def cell(self, digits: int = 3) -> str:
        """Return ``"mean ± std"`` (``"-"`` when there is no finite value)."""
        if self.n == 0:
            return "-"
        if self.n == 1 or math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


MEASURE_ORDER = (
    "insertion",
    "deletion",
    "retrain",
    "pointing",
    "mass",
    "positive mass",
    "sanity",
    "unmasked",
    "blank",
)


def _measure_key(measure: str) -> tuple:
    """Order measures by group (`MEASURE_ORDER`), then name, then p (``@p`` before the mean)."""
    group = next(
        (i for i, g in enumerate(MEASURE_ORDER) if measure.startswith(g)), len(MEASURE_ORDER)
    )
    match = re.fullmatch(r"(.*)@([\d.]+)", measure)
    if match:
        return (group, match.group(1), float(match.group(2)))
    return (group, measure.split(" ")[0], math.inf, measure)


def summarise(rows: Sequence[dict]) -> list[Summary]:
    """Return one `Summary` per (measure, method), NaN values left out, in a stable order.

    Parameters
    ----------
    rows : sequence of dict
        The rows of `evaluate`.

    Returns
    -------
    list of Summary
        Mean, standard deviation and count per (measure, method).
    """
    groups: dict[tuple[str, str], list[float]] = {}
    order_methods: list[str] = []
    for row in rows:
        groups.setdefault((row["measure"], row["method"]), []).append(float(row["value"]))
        if row["method"] not in order_methods:
            order_methods.append(row["method"])
    measures = sorted({m for m, _ in groups}, key=_measure_key)
    out = []
    for measure in measures:
        for method in order_methods:
            values = [v for v in groups.get((measure, method), []) if not math.isnan(v)]
            mean = statistics.fmean(values) if values else float("nan")
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            out.append(Summary(measure, method, mean, std, len(values)))
    return out


def paired_wins(rows: Sequence[dict], measure: str, method: str, other: str) -> tuple[int, int]:
    """Return ``(wins, n)``: units where ``method`` beats ``other`` on ``measure``, out of ``n``.

    Units are (seed, test image) pairs where both have a finite value; "beats" follows the
    measure's direction (ties are not wins).

    Parameters
    ----------
    rows : sequence of dict
        The rows of `evaluate`.
    measure : str
        The measure compared, e.g. ``"insertion@10"``.
    method, other : str
        The two method labels, e.g. ``"TFA [Grad-Cos]"``.

    Returns
    -------
    wins, n : int
        Units won by ``method``, and units compared.

    Raises
    ------
    ValueError
        When ``measure`` has no better direction.
    """
    sign = {HIGHER: 1.0, LOWER: -1.0}.get(direction(measure))
    if sign is None:
        raise ValueError(f"measure {measure!r} has no better direction")
    values: dict[str, dict[tuple, float]] = {method: {}, other: {}}
    for row in rows:
        if row["measure"] == measure and row["method"] in values:
            values[row["method"]][(row["seed"], row["test_index"])] = float(row["value"])
    shared = [
        u
        for u in values[method]
        if u in values[other] and not math.isnan(values[method][u] + values[other][u])
    ]
    wins = sum(sign * (values[method][u] - values[other][u]) > 0 for u in shared)
    return wins, len(shared)


def format_table(
    summaries: Sequence[Summary],
    methods: Sequence[str] | None = None,
    headers: Sequence[str] | None = None,
) -> str:
    """Return a plain-text table: one line per measure, one column per method (mean ± std).

    Parameters
    ----------
    summaries : sequence of Summary
        What `summarise` returns (or a part of it).
    methods : sequence of str, optional
        The columns, in order (every method of ``summaries`` by default).
    headers : sequence of str, optional
        Replaces the method names at the top of the columns.

    Returns
    -------
    str
        The table.
    """
    methods = (
        list(methods) if methods is not None else list(dict.fromkeys(s.method for s in summaries))
    )
    measures = list(dict.fromkeys(s.measure for s in summaries))
    cells = {(s.measure, s.method): s.cell() for s in summaries}
    header = ["measure"] + list(headers or methods)
    body = [
        [f"{measure} {direction(measure)}".rstrip()]
        + [cells.get((measure, m), "-") for m in methods]
        for measure in measures
    ]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header] + body
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


KEY_MEASURES = (
    "insertion mean",
    "deletion mean",
    "deletion |shift|",
    "retrain Δloss",
    "pointing: object",
    "pointing: patch",
    "mass in patch",
    "sanity ρ (all)",
)


def wins_table(rows: Sequence[dict], measures: Sequence[str] = KEY_MEASURES) -> str:
    """Return a text table: per scorer and measure, units where TFA beats each other map kind."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    label = {(r["scorer"], r["kind"]): r["method"] for r in rows}
    present = {r["measure"] for r in rows}
    lines = []
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        tfa = label.get((scorer, "tfa"))
        others = [k for k in kinds if k != "tfa" and (scorer, k) in label]
        if tfa is None or not others:
            continue
        lines.append(f"TFA [{scorer}] beats ... in (wins / units):")
        for measure in (m for m in measures if m in present):
            cells = []
            for kind in others:
                wins, n = paired_wins(rows, measure, tfa, label[(scorer, kind)])
                cells.append(f"{kind} {wins}/{n}")
            lines.append(f"  {measure} {direction(measure)}: " + ", ".join(cells))
    return "\n".join(lines)


def format_report(rows: Sequence[dict]) -> str:
    """Return the result tables (one per scorer, mean ± std over units) and the paired wins.

    Parameters
    ----------
    rows : sequence of dict
        The rows of `evaluate`.

    Returns
    -------
    str
        The report, ready to print.
    """
    summaries = summarise(rows)
    blocks = []
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["scorer"] == scorer))
        units = len({(r["seed"], r["test_index"]) for r in rows if r["scorer"] == scorer})
        blocks.append(f"scorer {scorer}: mean ± std over {units} (seed, test image) units")
        headers = [m.removesuffix(f" [{SCORER_LABELS[scorer]}]") for m in methods]
        blocks.append(format_table([s for s in summaries if s.method in methods], methods, headers))
        blocks.append("")
    blocks.append(wins_table(rows))
    return "\n".join(blocks)
