"""Agreement of tfa-widgets' scorers with kronfluence and dattri on one small model and data.

Not part of the test suite: the peers are not dependencies. Install them beside the shared
environment's torch without touching it, then run::

    pip install --no-deps --target /tmp/peers dattri kronfluence pretty_midi mido accelerate \
        einops einconv opt-einsum psutil huggingface_hub pyyaml
    PYTHONPATH=$PWD:/tmp/peers python benchmarks/peer_agreement.py

Model: a float64 MLP (two Linear layers, tanh) briefly trained on 256 Gaussian points with labels
from a random linear teacher; 8 test points, each explained for its label. Printed per scorer:
Spearman's rank correlation over all training points (mean over test points), the overlap of
the top 10 proponents, and the largest relative difference of the scores.

Measured 2026-12-02 (kronfluence 1.0.1, dattri 0.3.0, torch 2.14.1, CPU): influence with EK-FAC
equals kronfluence's to 2e-15; explicit-Hessian influence and RelatIF, TRAK with dattri's own
projection matrix, and grad-cos of dattri's projected gradients equal dattri's to float32
precision (dattri accumulates scores in float32). Residual differences, explained:

- dattri's EK-FAC (Spearman 0.45): it keeps eigenvectors as columns but rotates with
  ``Q_S G Q_Aᵀ`` instead of ``Q_Sᵀ G Q_A``, for the eigenvalue correction (its eigenvalues equal
  ``mean((Q_S G_i Q_Aᵀ)²)`` exactly) and for the inverse, so its preconditioner is not diagonal
  in the Kronecker eigenbasis; with a bias it also lays ``[W | b]`` out as
  ``cat(W.flatten(), b).reshape(out, in + 1)``. kronfluence and the explicit-Fisher tests agree
  with ours.
- TRAK with our count sketch against dattri's Gaussian projection: different random
  projections; they agree as ``d`` grows (0.33 at d=32, 0.92 at d=P=99, where only the
  regularisation still depends on the projection).
- grad-cos: dattri's TracIn always projects (d=512 by default); ours is exact.
- RelatIF with EK-FAC against dattri's explicit Hessian: different curvature (a Fisher against
  an indefinite Hessian), so no agreement is expected.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tfa_widgets.core.kfac import KFACSettings
from tfa_widgets.core.params import model_state
from tfa_widgets.core.scoring import (
    TRAK,
    FitContext,
    GradCos,
    Influence,
    RelatIF,
    score_inputs,
)
from tfa_widgets.core.scoring.reference import per_sample_grads

TOP = 10
PROJECTOR = {"proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
TRAK_DIMS = (99, 32)
TRAK_REGULARIZATION = 1e-3  # dattri's λ, on gradients it divides by sqrt(P)
COSINE_DIM = 512  # dattri's TracIn always projects; 512 is its default
HESSIAN_DAMPING = 1e-2


def problem(seed: int = 0):
    """Return the trained MLP and the train and test sets."""
    torch.manual_seed(seed)
    inputs = torch.randn(264, 8, dtype=torch.float64)
    labels = (inputs @ torch.randn(8, 3, dtype=torch.float64)).argmax(1)
    labels[::9] = torch.randint(0, 3, labels[::9].shape)  # some label noise
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        F.cross_entropy(model(inputs[:256]), labels[:256]).backward()
        optimiser.step()
    model.eval()
    return model, (inputs[:256], labels[:256]), (inputs[256:], labels[256:])


def ours(scorer, model, train, test, preconditioner=None) -> torch.Tensor:
    """Scores ``[n_test, n_train]`` of one of our scorers."""
    names = [n for n, _ in model.named_parameters()]
    context = FitContext(model, names, [train], progress=False)
    (preconditioner,) = [preconditioner] if preconditioner else scorer.prepare(context)
    state = model_state(model)
    train_grads = per_sample_grads(model, state, names, *train, "cross_entropy")
    test_grads = per_sample_grads(model, state, names, *test, "cross_entropy")
    rows = []
    for test_image, test_label, test_grad in zip(*test, test_grads, strict=True):
        p = model(test_image[None]).softmax(-1)[0, test_label]
        (weight,) = scorer.term_weights([p])
        rows.append(scorer.score([score_inputs(preconditioner, train_grads, test_grad, weight)]))
    return torch.stack(rows)


class ExplicitInverse:
    """``(H + λI)⁻¹`` of the exact training-loss Hessian, as dattri's explicit attributor uses."""

    def __init__(self, model, train, regularization: float) -> None:
        names = [n for n, _ in model.named_parameters()]
        state = model_state(model)
        flat = torch.cat([state[n].flatten() for n in names])
        shapes = [(n, state[n].shape) for n in names]

        def loss(vector):
            parameters, start = {}, 0
            for name, shape in shapes:
                parameters[name] = vector[start : start + shape.numel()].view(shape)
                start += shape.numel()
            logits = torch.func.functional_call(model, parameters, (train[0],))
            return F.cross_entropy(logits, train[1])

        hessian = torch.autograd.functional.hessian(loss, flat)
        self.inverse = torch.linalg.inv(hessian + regularization * torch.eye(len(flat)).double())

    def apply(self, grads):
        return grads @ self.inverse


def kronfluence_ekfac(model, train, test) -> torch.Tensor:
    """kronfluence's EK-FAC pairwise scores with the empirical Fisher, ``[n_test, n_train]``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = Classification()
    model = prepare_model(_copy(model), task)
    analyzer = Analyzer("agreement", model, task, cpu=True, output_dir=tempfile.mkdtemp())
    float64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=float64,
        gradient_covariance_dtype=float64,
        eigendecomposition_dtype=float64,
        lambda_dtype=float64,
        per_sample_gradient_dtype=float64,
    )
    score_args = ScoreArguments(
        damping_factor=None,  # 0.1 x each module's mean eigenvalue, our default
        per_sample_gradient_dtype=float64,
        precondition_dtype=float64,
        score_dtype=float64,
    )
    analyzer.fit_all_factors(
        "factors", TensorDataset(*train), factor_args=factor_args, per_device_batch_size=64
    )
    analyzer.compute_pairwise_scores(
        "scores",
        "factors",
        query_dataset=TensorDataset(*test),
        train_dataset=TensorDataset(*train),
        per_device_query_batch_size=8,
        per_device_train_batch_size=64,
        score_args=score_args,
    )
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def _copy(model):
    copy = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def _dattri_task(model, loss_func, target_func=None):
    from dattri.task import AttributionTask

    return AttributionTask(
        loss_func=loss_func, model=model, checkpoints=model.state_dict(), target_func=target_func
    )


def dattri_scores(model, train, test) -> dict[str, torch.Tensor]:
    """dattri's EK-FAC and explicit IF, RelatIF, TRAK and grad-cos, ``[n_test, n_train]``."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC, IFAttributorExplicit
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor

    model = _copy(model)

    def loss(params, data):
        image, label = data
        return F.cross_entropy(torch.func.functional_call(model, params, image), label)

    def margin(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        p = torch.exp(-F.cross_entropy(logits, label.unsqueeze(0)))
        return torch.log(p) - torch.log1p(-p)

    def probability(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        return torch.exp(-F.cross_entropy(logits, label.unsqueeze(0)))

    train_loader = DataLoader(TensorDataset(*train), batch_size=64)
    # One batch for the fitted curvature: dattri's explicit IF sums the inverse Hessians of the
    # cache loader's batches, which is the inverse of the full one only with a single batch.
    full_loader = DataLoader(TensorDataset(*train), batch_size=len(train[0]))
    test_loader = DataLoader(TensorDataset(*test), batch_size=8)
    results = {}

    ekfac = IFAttributorEKFAC(_dattri_task(model, loss), device="cpu", damping=1e-3)
    ekfac.cache(full_loader)
    results["influence"] = ekfac.attribute(train_loader, test_loader).T
    explicit = IFAttributorExplicit(
        _dattri_task(model, loss), device="cpu", regularization=HESSIAN_DAMPING
    )
    explicit.cache(full_loader)
    results["influence_hessian"] = explicit.attribute(train_loader, test_loader).T
    results["relatif_hessian"] = explicit.attribute(train_loader, test_loader, relatif_method="l").T
    for dim in TRAK_DIMS:
        trak = TRAKAttributor(
            _dattri_task(model, margin, margin),
            probability,
            device="cpu",
            projector_kwargs=dict(PROJECTOR, proj_dim=dim),
            regularization=TRAK_REGULARIZATION,
        )
        trak.cache(train_loader)
        results[f"trak_{dim}"] = trak.attribute(test_loader).T
    cosine = TracInAttributor(
        _dattri_task(model, loss),
        weight_list=torch.ones(1),
        normalized_grad=True,
        projector_kwargs=dict(PROJECTOR, proj_dim=COSINE_DIM),
        device="cpu",
    )
    results["grad_cos"] = cosine.attribute(train_loader, test_loader).T
    return results


def dattri_projection(num_params: int, dim: int) -> torch.Tensor:
    """dattri's random projection as a matrix ``[d, P]`` (its projections of the unit vectors)."""
    from dattri.func.projection import random_project

    eye = torch.eye(num_params, dtype=torch.float64)
    project = random_project(eye, num_params, **dict(PROJECTOR, proj_dim=dim))
    return project(eye, ensemble_id=0).double().T


class MatrixProjector:
    """An explicit projection ``Π``, ``[d, P]``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.matrix.T.to(grads)


class ProjectedGram:
    """``P = ΠᵀΠ``: grad-cos with it is the cosine of projected gradients."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.gram = matrix.T @ matrix

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        return grads @ self.gram


def agreement(name: str, mine: torch.Tensor, theirs: torch.Tensor, columns=None) -> None:
    """Print Spearman, top-10 overlap and the largest relative difference (over ``columns``)."""
    mine, theirs = mine.detach().double(), theirs.detach().double()
    rho = sum(spearmanr(a, b)[0] for a, b in zip(mine, theirs, strict=True)) / len(mine)
    overlap = sum(
        len(set(a.topk(TOP).indices.tolist()) & set(b.topk(TOP).indices.tolist()))
        for a, b in zip(mine, theirs, strict=True)
    ) / (TOP * len(mine))
    if columns is not None:
        mine, theirs = mine[:, columns], theirs[:, columns]
    difference = float((mine - theirs).abs().max() / theirs.abs().max())
    print(f"{name:<52} {rho:9.6f} {overlap:7.3f} {difference:12.2e}")


def main() -> None:
    model, train, test = problem()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{'ours vs peer':<52} {'Spearman':>9} {'top-10':>7} {'max rel diff':>12}")
    agreement(
        "influence EK-FAC vs kronfluence EK-FAC",
        ours(Influence(), model, train, test),
        kronfluence_ekfac(model, train, test),
    )
    peers = dattri_scores(model, train, test)
    absolute = KFACSettings(damping=1e-3, relative_damping=False)
    agreement(
        "influence EK-FAC vs dattri EK-FAC",
        ours(Influence(absolute), model, train, test),
        peers["influence"],
    )
    hessian = ExplicitInverse(model, train, HESSIAN_DAMPING)
    agreement(
        "influence, explicit Hessian vs dattri explicit",
        ours(Influence(), model, train, test, hessian),
        peers["influence_hessian"],
    )
    # The damped Hessian is indefinite: where g_iᵀ H⁻¹ g_i <= 0 the square root is guarded
    # differently (dattri clamps at 1e-12, we at the smallest float), so compare the others.
    names = [n for n, _ in model.named_parameters()]
    train_grads = per_sample_grads(model, model_state(model), names, *train, "cross_entropy")
    positive = (train_grads * hessian.apply(train_grads)).sum(1) > 1e-12
    agreement(
        f"RelatIF, explicit Hessian vs dattri ({int(positive.sum())} with gHg>0)",
        ours(RelatIF(), model, train, test, hessian),
        peers["relatif_hessian"],
        positive,
    )
    agreement(
        "RelatIF EK-FAC vs dattri explicit Hessian",
        ours(RelatIF(), model, train, test),
        peers["relatif_hessian"],
    )
    for dim in TRAK_DIMS:
        matrix = dattri_projection(num_params, dim)
        # dattri divides gradients by sqrt(P) before projecting: λ' there is P λ' here.
        scorer = TRAK(
            projector=MatrixProjector(matrix),
            regularization=num_params * TRAK_REGULARIZATION,
            relative=False,
        )
        agreement(
            f"TRAK d={dim}, dattri's projection, vs dattri TRAK",
            ours(scorer, model, train, test),
            peers[f"trak_{dim}"],
        )
        scorer = TRAK(dim=dim, regularization=num_params * TRAK_REGULARIZATION, relative=False)
        agreement(
            f"TRAK d={dim}, our count sketch, vs dattri TRAK",
            ours(scorer, model, train, test),
            peers[f"trak_{dim}"],
        )
    matrix = dattri_projection(num_params, COSINE_DIM)
    agreement(
        f"grad-cos of dattri's d={COSINE_DIM} projection vs dattri",
        ours(GradCos(), model, train, test, ProjectedGram(matrix)),
        peers["grad_cos"],
    )
    agreement(
        f"grad-cos (exact) vs dattri (projected to d={COSINE_DIM})",
        ours(GradCos(), model, train, test),
        peers["grad_cos"],
    )


if __name__ == "__main__":
    main()
