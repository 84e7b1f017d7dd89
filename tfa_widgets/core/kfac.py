"""Kronecker-factored curvature of Linear and Conv2d layers (K-FAC, EK-FAC) and its damped inverse.

For one layer, example ``i``'s gradient of the weight (with the bias as an extra column) is
``G_i = Σ_p δ_ip u_ipᵀ``, ``[out, K]``: ``u_ip`` is the layer input at position ``p`` (the
unfolded patch for a conv, with a 1 appended when the bias is selected), ``δ_ip`` the gradient of
the loss with respect to the output there, and ``p`` runs over the ``L`` positions of every call
of the layer. The Fisher block ``F = (1/N) Σ_i vec(G_i) vec(G_i)ᵀ`` (row-major ``vec``, so
``vec(δ uᵀ) = δ ⊗ u``) is approximated by ``S ⊗ A`` with (Martens & Grosse 2015; Grosse &
Martens 2016 for convolutions)::

    A = (1/N) Σ_i Σ_p u_ip u_ipᵀ,        S = (1/(N L)) Σ_i Σ_p δ_ip δ_ipᵀ.

``S ⊗ A`` is ``F`` with each ``δ_ip`` paired with every ``u_jq`` of the training set (positions
and examples assumed independent); it equals ``F`` exactly when ``L = 1`` and every example has
the same layer input. With ``A = Q_A diag(α) Q_Aᵀ`` and ``S = Q_S diag(σ) Q_Sᵀ``, K-FAC's
eigenvalues in the basis ``Q_S ⊗ Q_A`` are ``Λ_ok = σ_o α_k``; EK-FAC (George et al. 2018, as
kronfluence computes it for Grosse et al. 2023) replaces them by the exact diagonal of ``F`` in
that basis, ``Λ_ok = (1/N) Σ_i ((Q_Sᵀ G_i Q_A)_ok)²``: from the ``G_i`` kept in memory during
the factors' pass where they fit (`fit_kfac`'s ``keep_mb``), else from a second pass.
The inverse applied to a gradient is ``Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ``, with the damping
``λ = 0.1 · mean(Λ)`` per layer by default (kronfluence's heuristic when its ``damping_factor``
is ``None``), or an absolute value.

The empirical Fisher takes ``δ`` from the training labels; the true Fisher from labels sampled
from the model's own predictive distribution (a class from the softmax for cross-entropy, one
Bernoulli draw per class for BCE, ``y ~ N(f(x), 1)`` for squared error), which makes it the
Gauss-Newton matrix in expectation.

Only Linear and Conv2d layers (groups 1, zero padding) are factored. Selected parameters of any
other layer (BatchNorm, ...) are left out with a warning: their block of the preconditioner is
zero, so they take no part in the scores.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.factored import (
    FactoredGradients,
    _conv_supported,
    _summed_gradient,
)
from tfa_widgets.core.kfac_terms import (
    InputCovariance,
    RotatedSquares,
    inputs_are_rotated_first,
    kept_terms,
    layer_positions,
    patch_order,
)
from tfa_widgets.core.losses import REGRESSION_LOSS, batch_losses
from tfa_widgets.core.outputs import OutputFn, read_logits

FISHERS = ("empirical", "true")

#: Default memory (MB) for keeping every example's layer gradients during an EK-FAC fit.
KEEP_MB = 1024.0


@dataclass(frozen=True)
class KFACSettings:
    """How the Kronecker factors are fitted and damped.

    Parameters
    ----------
    fisher : {"empirical", "true"}
        Output gradients from the training labels, or from labels sampled from the model.
    eigenvalue_correction : bool
        EK-FAC (default): refit the eigenvalues in the Kronecker eigenbasis (a second pass).
        ``False`` gives plain K-FAC.
    damping : float
        Added to the eigenvalues before inverting: times each layer's mean eigenvalue when
        ``relative_damping`` (default 0.1, kronfluence's heuristic), else as it is.
    seed : int
        Seed of the sampled labels of the true Fisher.
    """

    fisher: str = "empirical"
    eigenvalue_correction: bool = True
    damping: float = 0.1
    relative_damping: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise InputError(f"unknown Fisher {self.fisher!r}; choose one of {FISHERS}")
        if not self.damping >= 0:
            raise InputError(f"damping must be a number >= 0, got {self.damping!r}")


@dataclass
class LayerFactors:
    """One layer's Kronecker factors, their eigenvectors and the (undamped) eigenvalues."""

    module: str
    weight: str | None  # the selected parameter names, None where not selected
    bias: str | None
    activation_covariance: torch.Tensor  # A, [K, K]
    gradient_covariance: torch.Tensor  # S, [out, out]
    activation_eigenvectors: torch.Tensor  # Q_A
    gradient_eigenvectors: torch.Tensor  # Q_S
    eigenvalues: torch.Tensor  # Λ, [out, K]: σ_o α_k (K-FAC) or corrected (EK-FAC)


_TENSOR_FIELDS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigenvectors",
    "gradient_eigenvectors",
    "eigenvalues",
)


class KFACPreconditioner:
    """Applies the damped inverse of the (E)K-FAC curvature to flat gradients.

    Parameters
    ----------
    layers : list of LayerFactors
        From `fit_kfac`.
    names, sizes : list
        The selected parameter names and their numbers of elements, in the order of the flat
        gradients; parameters of no layer in ``layers`` get a zero block.
    settings : KFACSettings
        The damping used.
    """

    def __init__(
        self,
        layers: list[LayerFactors],
        names: list[str],
        sizes: list[int],
        settings: KFACSettings,
    ) -> None:
        self.layers = layers
        self.names = list(names)
        self.sizes = list(sizes)
        self.settings = settings
        self.offsets = dict(zip(self.names, _cumulative(self.sizes), strict=True))
        self.size_of = dict(zip(self.names, self.sizes, strict=True))
        #: ``(⟨g_i, H⁻¹ g_i⟩, exp(−ℓ_i))`` of the training set when `fit_kfac` formed them.
        self.training_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the fitted factors as tensors named ``"module/field"`` (for ``safetensors``)."""
        return {
            f"{layer.module}/{field}": getattr(layer, field).contiguous()
            for layer in self.layers
            for field in _TENSOR_FIELDS
        }

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        names: list[str],
        sizes: list[int],
        settings: KFACSettings,
    ) -> KFACPreconditioner:
        """Return the preconditioner whose `tensors` these are, for the same selection."""
        layers = []
        for module in dict.fromkeys(key.rpartition("/")[0] for key in tensors):
            prefix = f"{module}." if module else ""
            weight, bias = (f"{prefix}{kind}" for kind in ("weight", "bias"))
            fields = {field: tensors[f"{module}/{field}"] for field in _TENSOR_FIELDS}
            layers.append(
                LayerFactors(
                    module,
                    weight if weight in names else None,
                    bias if bias in names else None,
                    **fields,
                )
            )
        return cls(layers, names, sizes, settings)

    def damping(self, layer: LayerFactors) -> float:
        """Return the damping added to ``layer``'s eigenvalues."""
        if self.settings.relative_damping:
            return self.settings.damping * float(layer.eigenvalues.mean())
        return self.settings.damping

    def apply_layer(self, layer: LayerFactors, grads: torch.Tensor) -> torch.Tensor:
        """Return ``H⁻¹ G`` for layer gradients ``G`` given as matrices ``[..., out, K]``."""
        q_s = layer.gradient_eigenvectors.to(grads)
        q_a = layer.activation_eigenvectors.to(grads)
        inverse = 1 / (layer.eigenvalues.to(grads) + self.damping(layer))
        return q_s @ ((q_s.mT @ grads @ q_a) * inverse) @ q_a.mT

    def quadratic_forms(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        loss: str,
        output: OutputFn | None = None,
    ) -> torch.Tensor:
        """Return ``⟨g_i, H⁻¹ g_i⟩`` of a batch, ``[B]``, without forming ``g_i``.

        ``Σ_layers Σ_ok (Q_Sᵀ G_i Q_A)²_ok / (Λ_ok + λ)`` from one batched forward and
        backward pass (the model's own weights, the labels' loss), rotating the layer inputs
        and output gradients as the eigenvalue correction does: half the products of
        `apply` on materialised gradients, and no ``[B, P]`` matrix.
        """
        layers = {layer.module: (layer.weight, layer.bias) for layer in self.layers}
        rotations = {
            layer.module: (layer.activation_eigenvectors, layer.gradient_eigenvectors)
            for layer in self.layers
        }
        owners = {
            name: (module, kind)
            for module, pair in layers.items()
            for name, kind in zip(pair, ("weight", "bias"), strict=True)
            if name is not None
        }
        collector = FactoredGradients(
            model,
            owners,
            functools.partial(_logits_of, model, output),
            functools.partial(_losses, loss=loss),
        )
        by_module = {layer.module: layer for layer in self.layers}
        total = images.new_zeros(len(images))
        for module, squares in _rotated_squares_of(collector, layers, rotations, images, targets):
            layer = by_module[module]
            inverse = (1 / (layer.eigenvalues + self.damping(layer))).flatten()
            forms = [chunk @ inverse.to(chunk) for chunk in squares.chunks()]
            total += torch.cat(forms).to(total)
        return total

    def apply(self, grads: torch.Tensor) -> torch.Tensor:
        """Return ``H⁻¹ g`` for flat gradients ``[..., P]`` (zero on parameters left out)."""
        result = torch.zeros_like(grads)
        for layer in self.layers:
            matrix = self._layer_matrix(layer, grads)
            preconditioned = self.apply_layer(layer, matrix)
            self._scatter(layer, preconditioned, result)
        return result

    def _slice(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + self.size_of[name])

    def _layer_matrix(self, layer: LayerFactors, grads: torch.Tensor) -> torch.Tensor:
        out = layer.gradient_covariance.shape[0]
        columns = []
        if layer.weight is not None:
            columns.append(grads[..., self._slice(layer.weight)].unflatten(-1, (out, -1)))
        if layer.bias is not None:
            columns.append(grads[..., self._slice(layer.bias)].unsqueeze(-1))
        return torch.cat(columns, dim=-1)

    def _scatter(self, layer: LayerFactors, matrix: torch.Tensor, result: torch.Tensor) -> None:
        if layer.weight is not None:
            weight_columns = matrix.shape[-1] - (layer.bias is not None)
            result[..., self._slice(layer.weight)] = matrix[..., :weight_columns].flatten(-2)
        if layer.bias is not None:
            result[..., self._slice(layer.bias)] = matrix[..., -1]


def fit_kfac(
    model: nn.Module,
    names: list[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss: str = "cross_entropy",
    settings: KFACSettings | None = None,
    progress: bool = True,
    output: OutputFn | None = None,
    keep_mb: float = KEEP_MB,
) -> KFACPreconditioner:
    """Return the (E)K-FAC preconditioner of ``model``'s selected parameters on a training set.

    EK-FAC with the empirical Fisher takes one pass over the data when every example's layer
    terms fit in ``keep_mb`` (`kept_terms`: the gradients ``G_i``, or a layer's inputs and
    output gradients where rotating those is cheaper): the pass collects ``A``, ``S`` and the
    terms; the eigenvalue correction and every ``⟨g_i, H⁻¹ g_i⟩`` then rotate the kept terms
    (the result's `training_terms`). Otherwise, and for the true Fisher (whose ``G_i`` come from
    sampled labels), a second pass corrects the eigenvalues and the self-scores are left to
    `KFACPreconditioner.quadratic_forms`.

    Parameters
    ----------
    model : nn.Module
        In eval mode (per-example output gradients must not depend on the batch).
    names : list of str
        Selected parameter names, in the order of the flat gradients it will precondition.
    batches : iterable of (images, encoded targets)
        The training set; iterated twice for EK-FAC when the gradients are not kept (a
        ``DataLoader`` or a list).
    loss : str
        A loss of `tfa_widgets.core.losses`.
    settings : KFACSettings, optional
        The Fisher, the eigenvalue correction and the damping (defaults: `KFACSettings()`).
    progress : bool
        Show progress bars.
    output : callable, optional
        Maps the model's output to its logits, as the engine's ``output=`` (`read_logits`).
    keep_mb : float
        Memory allowed for the kept per-example layer terms (0: never keep them).

    Returns
    -------
    KFACPreconditioner
        With `training_terms` set when the gradients were kept.

    Raises
    ------
    InputError
        No selected parameter belongs to a Linear or Conv2d layer, or ``batches`` is empty.
    """
    settings = settings or KFACSettings()
    owners = _factored_owners(model, names)
    generator = torch.Generator().manual_seed(settings.seed)
    losses: list[torch.Tensor] = []
    collector = FactoredGradients(
        model,
        owners,
        functools.partial(_logits_of, model, output),
        _fisher_loss(loss, settings, generator, losses),
    )
    layers = _layer_selection(owners)
    keep = settings.eigenvalue_correction and settings.fisher == "empirical"
    budget = keep_mb * 2**20 if keep else 0
    sums: dict[str, list] = {}
    kept: dict[str, list] | None = {}
    kept_bytes, count = 0, 0
    for images, targets in _progress(batches, progress, "K-FAC factors"):
        count += len(images)
        for module, (u, delta, x) in _activations_and_gradients(collector, layers, images, targets):
            bias = layers[module][1] is not None
            if module not in sums:
                sums[module] = [InputCovariance(collector.modules[module], bias), 0, 0]
            # In the inputs' precision (each batch's products already sum B·L terms in it).
            sums[module][0].add(u, x)
            # Per example, as δ is laid out: flattened first, it is copied (the demo's first
            # layer: 2.2 ms per batch of 64 instead of 1.2 on one CPU thread).
            sums[module][1] = sums[module][1] + torch.bmm(delta.mT, delta).sum(0)
            sums[module][2] += delta.shape[0] * delta.shape[1]
            if kept is not None:
                piece = kept_terms(u, delta, bias)
                tensors = piece if isinstance(piece, tuple) else (piece,)
                kept_bytes += sum(t.numel() * t.element_size() for t in tensors)
                if kept_bytes > budget:
                    kept = None  # over the budget: a second pass instead
                    continue
                kept.setdefault(module, []).append(piece)
    if count == 0:
        raise InputError("cannot fit K-FAC factors on an empty training set")
    factors, orders = {}, {}
    for module, (a_sum, s_sum, positions) in sums.items():
        a_sum = a_sum.total()
        # A in the patches' column order, then in the weight's (a permutation: same α).
        orders[module] = patch_order(
            collector.modules[module], *(name is not None for name in layers[module])
        )
        weight_order = orders[module].argsort()
        a = a_sum[weight_order][:, weight_order] / count
        s = s_sum / positions
        # Decomposed in the sums' precision: backward stable, so the eigenvectors are those of
        # a matrix within a few roundings of A, as A itself is, and EK-FAC's eigenvalues are
        # the Fisher's diagonal in whichever basis it is. For the demo's 576-column factors a
        # float32 eigh takes 31 ms on one CPU thread, float64 53.
        alpha, q_a = torch.linalg.eigh(a)
        sigma, q_s = torch.linalg.eigh(s)
        eigenvalues = sigma.clamp_min(0)[:, None] * alpha.clamp_min(0)[None, :]
        factors[module] = [a, s, q_a, q_s, eigenvalues]
    squares = None
    if settings.eigenvalue_correction:
        if kept is not None:
            squares = _rotated_squares(kept, factors, orders)
            # Summed in the gradients' precision over a chunk (at most a batch: B non-negative
            # terms, at most B units of rounding), then in float64, as the second pass does.
            corrected = {
                module: sum(
                    (chunk.new_ones(len(chunk)) @ chunk).double()
                    for piece in pieces
                    for chunk in piece.chunks()
                )
                for module, pieces in squares.items()
            }
        else:
            corrected = _corrected_eigenvalues(collector, layers, factors, batches, progress)
        for module, eigenvalues in corrected.items():
            factors[module][4] = eigenvalues.view(factors[module][4].shape) / count
    dtype = next(model.parameters()).dtype
    fitted = [
        LayerFactors(module, *layers[module], *(t.to(dtype) for t in factors[module]))
        for module in layers
        if module in factors
    ]
    parameters = dict(model.named_parameters())
    preconditioner = KFACPreconditioner(
        fitted, names, [parameters[n].numel() for n in names], settings
    )
    if squares is not None:
        preconditioner.training_terms = (
            _self_scores(preconditioner, squares),
            torch.cat(losses).neg().exp(),
        )
    return preconditioner


def _rotated_squares(kept: dict, factors: dict, orders: dict) -> dict[str, list[RotatedSquares]]:
    """``(Q_Sᵀ G_i Q_A)²`` of the kept terms per layer and batch, rotated in their place."""
    squares = {}
    for module, pieces in kept.items():
        dtype = pieces[0][0].dtype if isinstance(pieces[0], tuple) else pieces[0].dtype
        q_a, q_s = (factors[module][i].to(dtype) for i in (2, 3))
        q_a = q_a[orders[module]]
        squares[module] = pieces
        for i, piece in enumerate(pieces):
            pieces[i] = RotatedSquares(piece, q_a, q_s)
    return squares


def _self_scores(preconditioner: KFACPreconditioner, squares: dict) -> torch.Tensor:
    """``⟨g_i, H⁻¹ g_i⟩ = Σ_layers Σ_ok (Q_Sᵀ G_i Q_A)²_ok / (Λ_ok + λ)``, ``[N]``."""
    per_layer = []
    for layer in preconditioner.layers:
        inverse = (1 / (layer.eigenvalues + preconditioner.damping(layer))).flatten()
        scores = [
            chunk @ inverse.to(chunk) for piece in squares[layer.module] for chunk in piece.chunks()
        ]
        per_layer.append(torch.cat(scores))
    return torch.stack(per_layer).sum(0)


def _corrected_eigenvalues(collector, layers, factors, batches, progress) -> dict:
    """``Σ_i ((Q_Sᵀ G_i Q_A)_ok)²`` per layer, from a second pass over the data."""
    rotations = {module: (f[2], f[3]) for module, f in factors.items()}
    sums: dict[str, torch.Tensor] = {}
    for images, targets in _progress(batches, progress, "EK-FAC eigenvalues"):
        for module, squares in _rotated_squares_of(collector, layers, rotations, images, targets):
            for chunk in squares.chunks():
                sums[module] = sums.get(module, 0) + (chunk.new_ones(len(chunk)) @ chunk).double()
    return sums


def _rotated_squares_of(
    collector: FactoredGradients, layers: dict, rotations: dict, images, targets
):
    """Yield ``(module, RotatedSquares)`` of a batch per layer, ``rotations[module] = (Q_A, Q_S)``.

    In the cheaper order (`inputs_are_rotated_first`): a Linear layer rotates its inputs and
    output gradients, a conv with many positions (the demo's: ``L`` = 64 to 1024) its
    gradients ``G_i``, formed by the index's per-example machinery (on the CPU, one grouped
    convolution: 2-5x faster than ``unfold`` and a batched product,
    `tfa_widgets.core.factored`).
    """
    images = images.detach().requires_grad_(True)
    inputs, output_grads = collector.layer_terms(images, targets, create_graph=False)
    batch = len(images)
    for module_name, (weight, bias) in layers.items():
        module = collector.modules[module_name]
        calls = list(zip(inputs[module_name], output_grads[module_name], strict=True))
        if not calls:  # a layer the forward skips adds nothing
            continue
        q_a, q_s = rotations[module_name]
        out, columns = q_s.shape[0], q_a.shape[0]
        positions = sum(grad[0].numel() // out for _, grad in calls)
        if inputs_are_rotated_first(positions, out, columns):
            us, deltas = zip(
                *(layer_positions(module, x, g, weight is not None) for x, g in calls),
                strict=True,
            )
            u, delta = _joined(us), _joined(deltas)
            order = patch_order(module, weight is not None, bias is not None)
            yield module_name, RotatedSquares((u, delta), q_a[order].to(u), q_s.to(u))
            continue
        pieces = []
        if weight is not None:
            pieces.append(_summed_gradient(module, "weight", calls, batch).view(batch, out, -1))
        if bias is not None:
            pieces.append(_summed_gradient(module, "bias", calls, batch)[..., None])
        grads = torch.cat(pieces, -1)
        yield module_name, RotatedSquares(grads, q_a.to(grads), q_s.to(grads))


def _activations_and_gradients(collector: FactoredGradients, layers: dict, images, targets):
    """Yield ``(module, (u [B, L, K], δ [B, L, out], x))`` for each layer, positions of all
    calls (`layer_positions`); ``x`` is the layer's input where it was called once, else
    ``None``."""
    images = images.detach().requires_grad_(True)
    inputs, output_grads = collector.layer_terms(images, targets, create_graph=False)
    for module_name, (weight, _) in layers.items():
        module = collector.modules[module_name]
        calls = list(zip(inputs[module_name], output_grads[module_name], strict=True))
        if not calls:  # a layer the forward skips adds nothing
            continue
        us, deltas = zip(
            *(layer_positions(module, x, g, weight is not None) for x, g in calls),
            strict=True,
        )
        single = calls[0][0] if len(calls) == 1 and weight is not None else None
        yield module_name, (_joined(us), _joined(deltas), single)


def _joined(pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _factored_owners(model: nn.Module, names: list[str]) -> dict[str, tuple[str, str]]:
    """Owners (module, kind) of the selected Linear/Conv2d parameters; warn on the rest."""
    modules = dict(model.named_modules())
    owners, left_out = {}, []
    for name in names:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        factored = isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and _conv_supported(module)
        )
        if factored and kind in ("weight", "bias"):
            owners[name] = (module_name, kind)
        else:
            left_out.append(name)
    if not owners:
        raise InputError(
            "K-FAC covers Linear and Conv2d layers (groups=1, zero padding) and none of the "
            f"selected parameters {names[:6]} belongs to one; select such layers' parameters"
        )
    if left_out:
        warnings.warn(
            f"K-FAC leaves out {len(left_out)} selected parameters of layers it does not factor "
            f"({left_out[:6]}): they take no part in influence scores",
            stacklevel=3,
        )
    return owners


def _layer_selection(owners: dict) -> dict[str, tuple[str | None, str | None]]:
    """``{module: (weight name or None, bias name or None)}`` in the order of first appearance."""
    layers: dict[str, list] = {}
    for name, (module, kind) in owners.items():
        layers.setdefault(module, [None, None])[kind == "bias"] = name
    return {module: tuple(pair) for module, pair in layers.items()}


def _losses(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    return batch_losses(logits, targets, loss)


def _logits_of(model: nn.Module, output: OutputFn | None, images: torch.Tensor) -> torch.Tensor:
    return read_logits(model(images), output)


def _fisher_loss(
    loss: str, settings: KFACSettings, generator: torch.Generator, kept: list[torch.Tensor]
):
    """The per-example loss whose output gradients give the chosen Fisher (the empirical
    Fisher's losses, those of the labels, are appended to ``kept``)."""
    if settings.fisher == "empirical":

        def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            losses = batch_losses(logits, targets, loss)
            kept.append(losses.detach())
            return losses

        return label_loss

    def sampled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return batch_losses(logits, _sample_targets(logits.detach(), loss, generator), loss)

    return sampled_loss


def _sample_targets(logits: torch.Tensor, loss: str, generator: torch.Generator) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution, encoded for ``loss``."""
    if loss == "cross_entropy":
        probabilities = logits.softmax(-1).cpu()
        return torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(logits.device)
    if loss == REGRESSION_LOSS:
        noise = torch.randn(logits.shape[0], generator=generator, dtype=logits.dtype)
        return logits.squeeze(-1) + noise.to(logits.device)
    labels = torch.bernoulli(logits.sigmoid().cpu(), generator=generator).to(logits.device)
    return torch.stack([labels, torch.ones_like(labels)], dim=1)


def _progress(batches, progress: bool, description: str):
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=description, disable=not progress, leave=False)


def _cumulative(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets
