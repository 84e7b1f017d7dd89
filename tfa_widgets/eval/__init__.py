"""Faithfulness, localisation and sanity measures for TFA maps, against baselines.

``evaluate(engine, {seed: test indices}, EvalConfig())`` runs insertion, deletion, retraining,
localisation and the randomisation check for TFA and its baselines; ``format_report(rows)`` prints
the tables; ``pool_runs(files)`` reads runs saved by ``benchmarks/evaluate.py --json`` back.
Plotly figures are in `tfa_widgets.eval.plots`.
"""

from tfa_widgets.eval.baselines import MAP_KINDS, SCORERS, Method, method_maps
from tfa_widgets.eval.localisation import mass_in_mask, pointing_game
from tfa_widgets.eval.masking import keep_top, pixel_importance, remove_top, top_p_mask
from tfa_widgets.eval.perturbation import OneStep, perturbation_curve
from tfa_widgets.eval.report import EvalConfig, evaluate
from tfa_widgets.eval.sanity import randomised_copy, spearman
from tfa_widgets.eval.saved import SavedRuns, pool_runs
from tfa_widgets.eval.summary import format_report, format_table, paired_wins, summarise

__all__ = [
    "MAP_KINDS",
    "SCORERS",
    "EvalConfig",
    "Method",
    "OneStep",
    "SavedRuns",
    "evaluate",
    "format_report",
    "format_table",
    "keep_top",
    "mass_in_mask",
    "method_maps",
    "paired_wins",
    "perturbation_curve",
    "pixel_importance",
    "pointing_game",
    "pool_runs",
    "randomised_copy",
    "remove_top",
    "spearman",
    "summarise",
    "top_p_mask",
]
