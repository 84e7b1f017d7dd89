"""The evaluation on the embedded demo at a tiny setting (shared session fixtures)."""

import math

import pytest

from tfa_widgets import SmoothGrad
from tfa_widgets.eval.report import EvalConfig, evaluate
from tfa_widgets.eval.setups import demo_regions, demo_test_images

pytestmark = pytest.mark.portability

TINY = EvalConfig(
    k=2,
    ps=(10,),
    smooth=SmoothGrad(n=2),
    retrain_epochs=1,
    retrain_replay=6,
    retrain_batch_size=8,
    randomise=("all",),
    scorers=("grad_cos",),
)


@pytest.mark.slow
def test_demo_evaluation_end_to_end(demo, demo_engine):
    assert demo_test_images(demo, 2, [0])[0][0] in demo.metadata.patched_test_other
    # a patched test image of another class that the shortcut fooled: its proponents are patched
    predicted = demo.predictions("test")
    meta = demo.metadata
    test = next(i for i in meta.patched_test_other if predicted[i] == meta.shortcut_class)
    rows = evaluate(demo_engine, {0: [test]}, TINY, regions=demo_regions(demo), progress=False)

    def value(measure, kind):
        (row,) = [r for r in rows if r["measure"] == measure and r["kind"] == kind]
        return row["value"]

    # one step on the unmasked top proponents helps the prediction they were chosen for
    assert value("unmasked step", "tfa") < 0
    assert not math.isnan(value("mass in patch", "tfa"))
    for kind in ("random", "gradcam", "saliency", "tfa", "tfa_smooth"):
        assert 0.0 <= value("pointing: object", kind) <= 1.0
        assert not math.isnan(value("insertion@10", kind))
        assert not math.isnan(value("retrain Δloss", kind))
    assert value("sanity ρ (all)", "random") == pytest.approx(1.0)
    assert value("sanity ρ (all)", "tfa") < 0.9
