"""The interactive explorer: ipywidgets and Plotly figures wired to a TFA engine."""

from tfa_widgets.widgets.explorer import Explorer

__all__ = ["Explorer"]
