"""Scorers against explicit-matrix computations, their coefficients against autograd, and their
TFA maps against central finite differences, on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from smooth_models import images_and_labels, smooth_cnn
from torch import nn
from torch.func import functional_call, grad, vmap

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.kfac import KFACSettings
from tfa_widgets.core.projection import RandomProjector
from tfa_widgets.core.scoring import (
    SCORERS,
    TRAK,
    FitContext,
    GradCos,
    GradDot,
    Influence,
    RelatIF,
    ScoreInputs,
    Scorer,
    TracInCP,
    TRAKKernel,
    available_scorers,
    make_scorer,
    score_inputs,
    term_states,
)
from tfa_widgets.core.scoring.reference import per_sample_grads, tfa_maps


class MatrixPreconditioner:
    """An explicit ``P``, to test scorers apart from how ``P`` is fitted."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.matrix


class MatrixProjector:
    """An explicit projection ``Π``, ``[d, P]``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.matrix.T


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def flat_grads(model: nn.Module, images, labels) -> torch.Tensor:
    """Per-example loss gradients by a plain loop of backward passes, ``[N, P]``."""
    rows = []
    for image, label in zip(images, labels, strict=True):
        loss = F.cross_entropy(model(image[None]), label[None])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, model.parameters())]))
    return torch.stack(rows)


def fit_context(model, images, labels, checkpoints=()) -> FitContext:
    names = [n for n, _ in model.named_parameters()]
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    return FitContext(model, names, batches, checkpoints=list(checkpoints), progress=False)


def perturbed_checkpoints(model: nn.Module, count: int = 2) -> list[tuple[dict, float]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            {
                n: p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                for n, p in model.named_parameters()
            },
            0.5 + c,
        )
        for c in range(count)
    ]


# --- the registry ------------------------------------------------------------------------------


def test_registry_names_labels_and_needs():
    assert set(SCORERS) == {"grad_cos", "grad_dot", "tracin_cp", "influence", "relatif", "trak"}
    for name in SCORERS:
        scorer = make_scorer(name)
        assert isinstance(scorer, Scorer) and scorer.name == name and scorer.label
    assert available_scorers(set()) == ["grad_cos", "grad_dot"]
    assert "tracin_cp" in available_scorers({"checkpoints"})
    assert set(available_scorers({"factors", "projection"})) == {
        "grad_cos",
        "grad_dot",
        "influence",
        "relatif",
        "trak",
    }
    with pytest.raises(InputError, match="unknown scorer 'lissa'"):
        make_scorer("lissa")


def test_checkpoint_scorers_without_checkpoints_say_what_is_missing():
    model = smooth_cnn()
    images, labels = images_and_labels(8)
    with pytest.raises(InputError, match="TracIn-CP needs checkpoints"):
        TracInCP().prepare(fit_context(model, images, labels))
    with pytest.raises(InputError, match="TRAK over checkpoints needs checkpoints"):
        TRAK(ensemble=True).prepare(fit_context(model, images, labels))


# --- ∂S/∂g_i = a q + c P g_i against autograd ---------------------------------------------------

SCORER_CASES = [GradDot(), GradCos(), Influence(), RelatIF(), TRAK(), TracInCP()]


@pytest.mark.parametrize("scorer", SCORER_CASES, ids=lambda s: s.name)
def test_coefficients_are_the_derivative_of_the_score_in_the_training_gradient(scorer):
    # Two terms with their own P, test gradient and weight; each S_i depends on g_i^c only, so
    # the gradient of Σ_i S_i in g^c is row i's ∂S_i/∂g_i^c. Float64 throughout: the two sides
    # differ by rounding, ~1e-15 relative; 1e-10 is far above it and far below any slip.
    generator = torch.Generator().manual_seed(3)
    params, count = 12, 5
    terms, grads, preconditioners, queries = [], [], [], []
    for c in range(2 if scorer.name in ("tracin_cp", "trak") else 1):
        root = torch.randn(params, params, generator=generator, dtype=torch.float64)
        preconditioner = MatrixPreconditioner(
            torch.eye(params, dtype=torch.float64)
            if scorer.name in ("grad_dot", "grad_cos", "tracin_cp")
            else root @ root.T / params
        )
        g = torch.randn(count, params, generator=generator, dtype=torch.float64)
        test = torch.randn(params, generator=generator, dtype=torch.float64)
        g.requires_grad_(True)
        terms.append(score_inputs(preconditioner, g, test, weight=0.7 + c))
        grads.append(g)
        preconditioners.append(preconditioner)
        queries.append(preconditioner.apply(test))
    expected = torch.autograd.grad(scorer.score(terms).sum(), grads)
    for (a, c), g, preconditioner, query, want in zip(
        scorer.coefficients([_detached(t) for t in terms]),
        grads,
        preconditioners,
        queries,
        expected,
        strict=True,
    ):
        direction = a[:, None] * query
        if c is not None:
            direction = direction + c[:, None] * preconditioner.apply(g.detach())
        assert relative_error(direction, want) < 1e-10


def _detached(term: ScoreInputs) -> ScoreInputs:
    return ScoreInputs(term.dots.detach(), term.train_self.detach(), term.test_self, term.weight)


# --- scores against explicit-matrix computations ------------------------------------------------


def test_similarity_scorers_are_the_plain_gradient_formulas():
    model = smooth_cnn()
    images, labels = images_and_labels(9)
    train, test = (
        flat_grads(model, images[:8], labels[:8]),
        flat_grads(model, images[8:], labels[8:])[0],
    )
    identity = MatrixPreconditioner(torch.eye(train.shape[1], dtype=torch.float64))
    terms = [score_inputs(identity, train, test)]
    dots = train @ test
    assert relative_error(GradDot().score(terms), dots) < 1e-12
    cosines = dots / (train.norm(dim=1) * test.norm())
    assert relative_error(GradCos().score(terms), cosines) < 1e-12
    a, c = GradCos().coefficients(terms)[0]
    norms, norm = train.norm(dim=1), test.norm()
    assert relative_error(a, 1 / (norms * norm)) < 1e-12
    assert relative_error(c, -cosines / norms.square()) < 1e-12


def test_tracin_cp_sums_learning_rate_weighted_dots_over_checkpoints():
    model = smooth_cnn()
    images, labels = images_and_labels(9)
    checkpoints = perturbed_checkpoints(model)
    context = fit_context(model, images[:8], labels[:8], checkpoints)
    scorer = TracInCP()
    preconditioners = scorer.prepare(context)
    weights = scorer.term_weights([torch.tensor(0.5)] * len(checkpoints))
    terms, expected = [], 0
    for (state, rate), preconditioner, weight in zip(
        checkpoints, preconditioners, weights, strict=True
    ):
        copy = smooth_cnn()
        copy.load_state_dict(state)
        train, test = (
            flat_grads(copy, images[:8], labels[:8]),
            flat_grads(copy, images[8:], labels[8:])[0],
        )
        expected = expected + rate * (train @ test)
        terms.append(score_inputs(preconditioner, train, test, weight))
    assert relative_error(scorer.score(terms), expected) < 1e-12


def shared_input_data(n: int = 40):
    # Every training example has the same input, so K-FAC (and EK-FAC) equal the empirical
    # Fisher exactly (see test_core_kfac) and influence has an explicit-matrix ground truth.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double().eval()
    images = torch.randn(1, 4, dtype=torch.float64).expand(n, 4).contiguous()
    labels = torch.randint(0, 3, (n,))
    return model, images, labels


@pytest.mark.parametrize("correction", [True, False], ids=["ekfac", "kfac"])
def test_influence_and_relatif_equal_the_explicit_damped_fisher_inverse(correction):
    model, images, labels = shared_input_data()
    settings = KFACSettings(eigenvalue_correction=correction, damping=1e-3, relative_damping=False)
    context = FitContext(model, ["weight", "bias"], [(images, labels)], progress=False)
    train = flat_grads(model, images, labels)
    test_image = torch.randn(1, 4, dtype=torch.float64)
    test = flat_grads(model, test_image, torch.tensor([1]))[0]
    damped = train.T @ train / len(train) + 1e-3 * torch.eye(train.shape[1], dtype=torch.float64)
    influence = torch.linalg.solve(damped, train.T).T @ test  # ⟨g_t, (F + λI)⁻¹ g_i⟩
    self_influence = (train * torch.linalg.solve(damped, train.T).T).sum(1)
    # The damped Fisher has condition number ~1e3 here: float64 solves keep ~1e-12 relative.
    for scorer, expected in (
        (Influence(settings), influence),
        (RelatIF(settings), influence / self_influence.sqrt()),
    ):
        (preconditioner,) = scorer.prepare(context)
        assert (
            relative_error(scorer.score([score_inputs(preconditioner, train, test)]), expected)
            < 1e-9
        )


def margin_gradients(model, state, images, labels):
    """TRAK's features before projection: ``∇_θ log(p / (1 − p))`` of each example, and ``p``."""
    names = [n for n, _ in model.named_parameters()]

    def margin(parameters, image, label):
        logits = functional_call(model, {**state, **parameters}, (image[None],))[0]
        p = logits.softmax(-1).gather(0, label[None])[0]
        return torch.log(p) - torch.log1p(-p)

    def probability(image, label):
        return (
            functional_call(model, state, (image[None],))[0].softmax(-1).gather(0, label[None])[0]
        )

    grads = vmap(grad(margin), in_dims=(None, 0, 0))({n: state[n] for n in names}, images, labels)
    flat = torch.cat([grads[n].flatten(1) for n in names], 1)
    return flat, vmap(probability)(images, labels)


def literal_trak(
    model, states, projection, train_images, train_labels, test_image, test_label, regularization
):
    """TRAK as its paper defines it, averaged over checkpoints: ``φ_tᵀ (ΦᵀΦ + λI)⁻¹ φ_i (1 − p_i)``
    with ``φ = Π ∇_θ log(p / (1 − p))``."""
    total = 0
    for state in states:
        features, p = margin_gradients(model, state, train_images, train_labels)
        phi = features @ projection.T
        kernel = phi.T @ phi + regularization * torch.eye(len(projection), dtype=torch.float64)
        test_features, _ = margin_gradients(model, state, test_image[None], test_label[None])
        test_phi = test_features[0] @ projection.T
        total = total + phi @ torch.linalg.solve(kernel, test_phi) * (1 - p)
    return total / len(states)


@pytest.mark.parametrize("ensemble", [False, True], ids=["model", "checkpoints"])
def test_trak_equals_its_literal_definition_with_margin_gradients(ensemble):
    model = smooth_cnn()
    images, labels = images_and_labels(31)
    train_images, train_labels, test_image, test_label = (
        images[:30],
        labels[:30],
        images[30],
        labels[30],
    )
    checkpoints = perturbed_checkpoints(model)
    context = fit_context(model, train_images, train_labels, checkpoints)
    generator = torch.Generator().manual_seed(5)
    num_params = sum(p.numel() for p in model.parameters())
    projection = torch.randn(16, num_params, generator=generator, dtype=torch.float64) / 4
    scorer = TRAK(
        projector=MatrixProjector(projection),
        regularization=1e-3,
        relative=False,
        ensemble=ensemble,
    )
    kernels = scorer.prepare(context)
    states = term_states(context, ensemble)
    probabilities = [
        margin_gradients(model, s, test_image[None], test_label[None])[1][0] for s in states
    ]
    terms = [
        score_inputs(
            kernel,
            per_sample_grads(
                model, state, context.names, train_images, train_labels, "cross_entropy"
            ),
            per_sample_grads(
                model, state, context.names, test_image[None], test_label[None], "cross_entropy"
            )[0],
            weight,
        )
        for kernel, state, weight in zip(
            kernels, states, scorer.term_weights(probabilities), strict=True
        )
    ]
    expected = literal_trak(
        model, states, projection, train_images, train_labels, test_image, test_label, 1e-3
    )
    # ΦᵀΦ + λI over 30 features in 16 dimensions is well conditioned (~1e3): ~1e-12 relative.
    assert relative_error(scorer.score(terms), expected) < 1e-9


@pytest.mark.portability
@pytest.mark.parametrize("count", [20, 5])  # N > d: the d × d inverse; N < d: Woodbury's N × N
def test_trak_kernel_with_the_count_sketch_applies_its_explicit_matrix(count):
    # Π of the RandomProjector as a matrix (its projections of the unit vectors); Πᵀ comes from
    # autograd in TRAKKernel, here from the matrix's transpose.
    generator = torch.Generator().manual_seed(2)
    projector = RandomProjector(50, 8, seed=4)
    matrix = projector.project(torch.eye(50, dtype=torch.float64)).T  # [d, P]
    features = torch.randn(count, 8, generator=generator, dtype=torch.float64)
    kernel = TRAKKernel(projector, features, regularization=0.01, relative=True)
    assert (kernel.inverse is None) == (count < 8)
    grads = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    gram = features.T @ features
    damped = gram + 0.01 * float(gram.trace()) / 8 * torch.eye(8, dtype=torch.float64)
    expected = (matrix.T @ torch.linalg.solve(damped, matrix @ grads.T)).T
    # float64 with a kernel of condition ~1e3 (Woodbury's subtraction loses as much): ~1e-13.
    assert relative_error(kernel.apply(grads), expected) < 1e-10
    own = (torch.linalg.solve(damped, features.T).T * features).sum(1)
    assert relative_error(kernel.feature_quadratic_forms(features), own) < 1e-10
    restored = TRAKKernel.from_tensors(projector, kernel.tensors())
    assert relative_error(restored.apply(grads), expected) < 1e-10
    if count < 8:
        with pytest.raises(InputError, match="singular"):
            TRAKKernel(projector, features, regularization=0.0)


def test_trak_refuses_a_loss_it_has_no_reweighting_for():
    model = smooth_cnn()
    images, labels = images_and_labels(8)
    context = fit_context(model, images, labels)
    context.loss = "bce"
    with pytest.raises(InputError, match="cross-entropy"):
        TRAK().prepare(context)


# --- TFA maps against central finite differences of S in training pixels -----------------------


def score_of_images(scorer, preconditioners, states, weights, tests, names, images, labels):
    terms = [
        score_inputs(
            p,
            per_sample_grads(model_for_maps, state, names, images, labels, "cross_entropy"),
            test,
            weight,
        )
        for p, state, test, weight in zip(preconditioners, states, tests, weights, strict=True)
    ]
    return scorer.score(terms)


model_for_maps = smooth_cnn()

MAP_CASES = [
    GradCos(),
    GradDot(),
    TracInCP(),
    Influence(),
    RelatIF(),
    Influence(KFACSettings(fisher="true", eigenvalue_correction=False)),
    TRAK(dim=24),
    TRAK(dim=24, ensemble=True),
]


@pytest.mark.parametrize(
    "scorer",
    MAP_CASES,
    ids=[
        "grad_cos",
        "grad_dot",
        "tracin_cp",
        "influence",
        "relatif",
        "influence_kfac_true_fisher",
        "trak",
        "trak_checkpoints",
    ],
)
def test_maps_are_central_finite_differences_of_the_score(scorer):
    model = model_for_maps
    images, labels = images_and_labels(13)
    uses_checkpoints = scorer.name == "tracin_cp" or getattr(scorer, "ensemble", False)
    context = fit_context(model, images[:12], labels[:12], perturbed_checkpoints(model))
    preconditioners = scorer.prepare(context)
    states = term_states(context, uses_checkpoints)
    test_image, test_label = images[12:], labels[12:]
    tests = [
        per_sample_grads(model, s, context.names, test_image, test_label, "cross_entropy")[0]
        for s in states
    ]
    probabilities = [
        functional_call(model, s, (test_image,))[0].softmax(-1)[test_label[0]] for s in states
    ]
    weights = scorer.term_weights(probabilities)
    chosen, chosen_labels = images[:3], labels[:3]
    maps = tfa_maps(
        scorer,
        preconditioners,
        states,
        model,
        context.names,
        "cross_entropy",
        chosen,
        chosen_labels,
        tests,
        weights,
    )
    # Central differences along 8 single pixels and 4 random directions per image (the random
    # ones check the whole map; all 72 pixels of 3 images were slow on a loaded CPU).
    generator = torch.Generator().manual_seed(11)
    size = chosen[0].numel()
    pixels = torch.eye(size, dtype=torch.float64)[torch.randperm(size, generator=generator)[:8]]
    directions = torch.cat([pixels, torch.randn(4, size, generator=generator, dtype=torch.float64)])
    directions = directions.view(-1, *chosen.shape[1:])
    step = 1e-4
    batch = torch.cat([chosen[:, None] + step * directions, chosen[:, None] - step * directions])
    scores = score_of_images(
        scorer,
        preconditioners,
        states,
        weights,
        tests,
        context.names,
        batch.flatten(0, 1),
        chosen_labels.repeat(2).repeat_interleave(12),
    )
    plus, minus = scores.view(2, len(chosen), 12)
    finite = (plus - minus) / (2 * step)  # [images, directions]
    along = torch.einsum("nchw,dchw->nd", maps, directions)
    # Central differences of a smooth float64 function: truncation ~ step² |S'''| ~ 1e-8 of the
    # map's scale, rounding ~ 1e-16 |S| / step ~ 1e-12; 1e-6 sits well above both.
    assert relative_error(along, finite) < 1e-6
    assert finite.abs().min() > 0
