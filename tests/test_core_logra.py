"""The factorised (LoGra) projection: against explicitly formed gradients, unbiasedness over
seeds, exactness with full orthogonal matrices, exact norms, and the index that records it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from core_models import conv_paths_model, small_cnn, small_dataset
from precision import float32_cosine_tolerance, gamma
from torch import nn

from tfa_widgets import TFAEngine
from tfa_widgets.core.errors import InputError
from tfa_widgets.core.factored import _summed_gradient, _unfold
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.logra import (
    FactorisedProjector,
    _ghost_squared_norms,
    _input_gram,
    gradient_layout,
    make_projector,
)

pytestmark = pytest.mark.portability


def batch(n: int = 5, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 3, (n,), generator=generator)


def gradient_model(model=None) -> GradientModel:
    model = conv_paths_model() if model is None else model
    names = [name for name, _ in model.named_parameters()]
    return GradientModel(model, names, "cross_entropy", strategy="factored")


def absolute_terms(gradients: GradientModel, images, targets) -> torch.Tensor:
    """``Σ_t |δ_t| |u_t|ᵀ`` per parameter (``Σ_t |δ_t|`` for a bias), flattened ``[B, P]``:
    the sum of absolute values of the products that make each per-sample gradient entry."""
    factored = gradients.factored
    inputs, output_grads = factored.layer_terms(
        images.detach().requires_grad_(True), targets, create_graph=False
    )
    pieces = []
    for name in factored.names:
        module_name, kind = factored.owners[name]
        calls = [
            (x.abs(), g.abs())
            for x, g in zip(inputs[module_name], output_grads[module_name], strict=True)
        ]
        pieces.append(_summed_gradient(factored.modules[module_name], kind, calls, len(images)))
    return torch.cat(pieces, dim=1)


def absolute_projector(projector: FactorisedProjector) -> FactorisedProjector:
    """The projector with every matrix entry and sign replaced by its absolute value."""
    absolute = copy.copy(projector)
    absolute.matrices = [(p_out.abs(), p_in.abs()) for p_out, p_in in projector.matrices]
    absolute._on = {}
    if projector.sketch is not None:
        absolute.sketch = copy.copy(projector.sketch)
        absolute.sketch.signs = projector.sketch.signs.abs()
        absolute.sketch._on = {}
    return absolute


def terms_bound(gradients: GradientModel, images) -> int:
    """An upper bound on the number of products summed into any computed entry: positions of
    the widest layer input times the parameters (each entry sums over fewer)."""
    return images[0].numel() * 9 * gradients.num_params


def built_rows(projector, gradients, images, targets):
    rows = torch.zeros(len(images), projector.dim, dtype=torch.float64)
    norms = projector.store_batch(gradients.factored, images, targets, rows)
    return rows, norms


@pytest.mark.parametrize("dim", [64, 700])
def test_built_rows_equal_the_projection_of_explicit_gradients(dim):
    gradients = gradient_model()
    images, targets = batch()
    projector = FactorisedProjector(gradient_layout(gradients), dim, seed=1)
    assert projector.dim <= dim and projector.dim > dim * 0.8
    rows, norms = built_rows(projector, gradients, images, targets)
    explicit = gradients.per_sample_grads(images, targets)  # formed in full, float64
    # Both sides sum the same products |P_out| |δ_t| |u_t| |P_in| (and signed sketch terms) in
    # different orders: each is within gamma(n) of that sum of absolute values (Higham §3).
    bound = absolute_projector(projector).project(absolute_terms(gradients, images, targets))
    tolerance = 2 * gamma(terms_bound(gradients, images), torch.float64) * bound
    assert bool(((rows - projector.project(explicit)).abs() <= tolerance).all())
    # The query path (`project`) on one gradient is the same as on a batch.
    torch.testing.assert_close(projector.project(explicit[2]), projector.project(explicit)[2])
    # Norms: ‖W‖² sums products of |W| entries, each within gamma(n) Σ|δ||u|: the squared
    # norms of both are within 3 gamma(n) ‖Σ_t |δ_t||u_t|ᵀ‖² (ghost norms: the same bound, by
    # Cauchy-Schwarz).
    squares = absolute_terms(gradients, images, targets).square().sum(1)
    allowed = 4 * gamma(terms_bound(gradients, images), torch.float64) * squares
    assert bool(((norms.square() - explicit.square().sum(1)).abs() <= allowed).all())


CONVS = [  # (in, out, kernel, stride, padding, dilation, input side)
    (3, 4, 3, 1, 1, 1, 8),
    (4, 5, (3, 1), (2, 1), (1, 0), 1, 9),
    (5, 4, 3, 1, 2, 2, 8),
    (4, 6, 1, 2, 0, 1, 8),
    (6, 12, 3, 4, 1, 1, 16),
    (8, 8, 3, 2, 1, 1, 7),
]


@pytest.mark.parametrize("conv", CONVS)
def test_ghost_norms_from_the_padded_input_gram_equal_explicit_ones(conv):
    channels_in, channels_out, kernel, stride, padding, dilation, side = conv
    torch.manual_seed(1)
    module = nn.Conv2d(channels_in, channels_out, kernel, stride, padding, dilation).double()
    x = torch.randn(3, channels_in, side, side, dtype=torch.float64)
    grad = torch.randn_like(module(x))
    patches = _unfold(module, x)  # [B, K, L]: the explicit unfolded input
    # Each Gram entry sums K products: both orders are within gamma(K) of the sum of |products|.
    absolute = torch.bmm(patches.abs().transpose(1, 2), patches.abs())
    allowed = 2 * gamma(patches.shape[1], torch.float64) * absolute
    gram = _input_gram(module, x, grad.shape[-2:])
    assert bool(((gram - torch.bmm(patches.transpose(1, 2), patches)).abs() <= allowed).all())
    weights = torch.bmm(grad.flatten(2), patches.transpose(1, 2))  # W_i formed in full
    terms = patches.shape[1] * patches.shape[2] ** 2 * channels_out
    bound = torch.bmm(grad.abs().flatten(2), patches.abs().transpose(1, 2)).square().sum((1, 2))
    error = (_ghost_squared_norms(module, x, grad) - weights.square().sum((1, 2))).abs()
    assert bool((error <= 4 * gamma(terms, torch.float64) * bound).all())


def test_full_orthogonal_matrices_keep_inner_products_exactly():
    gradients = gradient_model()
    images, targets = batch(6)
    projector = FactorisedProjector(gradient_layout(gradients), 10**6, seed=2)
    layers = [(out, inp) for _, out, inp in projector.layout if out]
    assert projector.shapes == layers  # k_out = out, k_in = in: square orthogonal matrices
    assert projector.dim == gradients.num_params
    rows, _ = built_rows(projector, gradients, images, targets)
    explicit = gradients.per_sample_grads(images, targets)
    # P_out, P_in orthogonal to within n u (Householder QR), the sketch a signed permutation:
    # ⟨P a, P b⟩ = ⟨a, b⟩ up to rounding, bounded through the sums of absolute values.
    absolute = absolute_projector(projector).project(absolute_terms(gradients, images, targets))
    n = terms_bound(gradients, images)
    allowed = 4 * gamma(n, torch.float64) * (absolute @ absolute.T)
    assert bool(((rows @ rows.T - explicit @ explicit.T).abs() <= allowed).all())


def test_projected_inner_products_are_unbiased_over_seeds():
    gradients = gradient_model()
    images, targets = batch(2, seed=4)
    explicit = gradients.per_sample_grads(images, targets)
    exact = float(explicit[0] @ explicit[1])
    layout = gradient_layout(gradients)
    estimates = torch.stack(
        [
            (lambda p: p[0] @ p[1])(FactorisedProjector(layout, 40, seed=s).project(explicit))
            for s in range(400)
        ]
    )
    assert FactorisedProjector(layout, 40, seed=0).dim < gradients.num_params / 10
    # The estimates are i.i.d. with a finite variance; their mean is within 5 standard errors
    # of its expectation (the exact inner product) but for a chance below 1e-6 (CLT); the seeds
    # are fixed, so the test is deterministic. The spread is large: it is an estimate.
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) <= 5 * standard_error
    assert float(estimates.std()) > 0.05 * abs(exact)


def test_layout_factorises_linear_and_conv_weights_only():
    gradients = gradient_model(small_cnn())
    layout = gradient_layout(gradients)
    names = gradients.names
    factorised = [name for name, (_, out, _) in zip(names, layout, strict=True) if out]
    assert factorised == ["0.weight", "4.weight", "7.weight"]
    assert [size for size, _, _ in layout] == gradients.sizes
    vmapped = GradientModel(small_cnn(), names, "cross_entropy", strategy="vmap")
    assert make_projector("logra", vmapped, 32, 0).__class__.__name__ == "RandomProjector"


def test_engine_records_the_projection_and_scores_with_it(tmp_path):
    def engine(projection):
        return TFAEngine(
            small_cnn(),
            small_dataset(12),
            small_dataset(2, seed=7),
            cache_dir=tmp_path,
            progress=False,
            memory_budget_mb=0,
            projection_dim=48,
            projection=projection,
        )

    logra, sketch = engine("logra"), engine("countsketch")
    index = logra.build_index()
    assert index.projection == "logra" and sketch.build_index().projection == "countsketch"
    assert logra.index_builds == sketch.index_builds == 1  # two fingerprints, two files
    loaded = GradientIndex.load(
        next(p for p in tmp_path.glob("*.safetensors") if _projection_of(p) == "logra"),
        index.fingerprint,
    )
    assert loaded.projection == "logra" and loaded.layout == [list(e) for e in index.layout]
    test_grad = logra._test_gradients.get(logra._model_term, logra.query(0, 1))
    torch.testing.assert_close(loaded.project_query(test_grad), index.project_query(test_grad))
    assert loaded.project_query(test_grad).shape == (index.features.shape[1],)
    # top_k still re-scores exactly: its values are the exact engine's scores, both within the
    # float32 index bound of the float64 truth (precision.py), so twice that between them.
    exact = TFAEngine(small_cnn(), small_dataset(12), small_dataset(2, seed=7), progress=False)
    bound = float32_cosine_tolerance(exact._model_term.gradients.num_params)
    indices, values = logra.top_k(0, 3)
    torch.testing.assert_close(
        values, exact.scores(0)[indices], **{name: 2 * v for name, v in bound.items()}
    )
    with pytest.raises(InputError, match="unknown projection"):
        engine("gaussian")


def _projection_of(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("projection", "")
