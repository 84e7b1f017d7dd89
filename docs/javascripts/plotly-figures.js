// Draws the Plotly figures of the executed notebooks, saved as JSON by docs/hooks/build.py.
function drawPlotlyFigures() {
  document.querySelectorAll("div.tfa-plotly:not([data-drawn])").forEach(function (div) {
    var figure = JSON.parse(div.dataset.figure);
    div.dataset.drawn = "1";
    Plotly.newPlot(div, figure.data, figure.layout || {}, { displaylogo: false });
  });
}
if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", drawPlotlyFigures);
} else {
  drawPlotlyFigures();
}
