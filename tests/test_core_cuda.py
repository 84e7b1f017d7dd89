"""The engine on a CUDA device agrees with the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch
from core_models import conv_paths_model, small_cnn, small_dataset
from precision import float32_cosine_tolerance, ranking_margin

from tfa_widgets import SmoothGrad, TFAEngine

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_engine_agrees_with_cpu(tmp_path):
    train, test = small_dataset(40), small_dataset(2, seed=7)
    cpu = TFAEngine(small_cnn(), train, test, progress=False)
    gpu = TFAEngine(
        small_cnn(), train, test, device="cuda", cache_dir=tmp_path, progress=False,
        memory_budget_mb=1e-3, projection_dim=128,
    )  # fmt: skip
    assert gpu.build_index().projected
    # Both devices score the float64 model from float32 gradients, each within the float32 index
    # bound of the float64 truth (precision.py): they agree within twice that, and the top 5 is
    # compared only because the scores decide it by more than twice that again.
    bound = float32_cosine_tolerance(cpu._model_term.gradients.num_params)
    tolerance = {name: 2 * value for name, value in bound.items()}
    assert ranking_margin(cpu.scores(0), 5) > 2 * (tolerance["atol"] + tolerance["rtol"])
    indices, values = gpu.top_k(0, 5)
    expected_indices, expected_values = cpu.top_k(0, 5)
    assert indices.tolist() == expected_indices.tolist()
    torch.testing.assert_close(values.cpu(), expected_values, **tolerance)
    smooth = SmoothGrad(n=3, sigma=0.1, seed=1)
    torch.testing.assert_close(
        gpu.tfa_maps(0, indices, smooth=smooth), cpu.tfa_maps(0, indices, smooth=smooth)
    )
    torch.testing.assert_close(gpu.gradcam(test[0][0], 1), cpu.gradcam(test[0][0], 1))
    explanation = gpu.explain(1, k=3)
    assert explanation.tfa_maps.device.type == "cpu" and explanation.k == 3


def test_cuda_factored_maps_agree_with_vmap_on_every_conv_path():
    # On CUDA conv weights take unfold + bmm or ghost norms (no grouped path); vmap is the
    # independent reference.
    model = conv_paths_model().cuda()
    train, test = small_dataset(5, size=16), small_dataset(1, size=16, seed=7)
    engines = [
        TFAEngine(model, train, test, device="cuda", strategy=s, progress=False)
        for s in ("vmap", "factored")
    ]
    torch.testing.assert_close(engines[0].scores(0), engines[1].scores(0))
    torch.testing.assert_close(engines[0].tfa_maps(0, [1, 3]), engines[1].tfa_maps(0, [1, 3]))
