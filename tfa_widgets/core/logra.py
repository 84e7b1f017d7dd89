"""Factorised random projection of per-sample gradients (LoGra, Choe et al. 2024).

A Linear or Conv2d weight's per-sample gradient is ``W_i = Σ_t δ_t u_tᵀ`` over the layer's
positions ``t`` (``δ_t`` the output gradient, ``u_t`` the input, unfolded for a convolution).
With seeded random matrices ``P_out [out, k_out]`` and ``P_in [in, k_in]`` its projection
``P_outᵀ W_i P_in = Σ_t (P_outᵀ δ_t)(P_inᵀ u_t)ᵀ`` is formed from the two small projected
factors, never from ``W_i``: for a convolution ``P_inᵀ u_t`` is itself a convolution of the
input with ``k_in`` filters, so not even the unfolded input is formed. The cost grows with the
layer's widths, not with their product. The other parameters (biases, BatchNorm) keep the
shifted-block CountSketch of `tfa_widgets.core.projection`.

Each ``P = sqrt(n / k) Q`` with ``Q`` the first ``k`` orthonormal columns of a Gaussian
matrix (a uniformly random ``k``-dimensional subspace), so ``E[P Pᵀ] = I`` and, ``P_in`` and
``P_out`` being independent, ``E⟨P_outᵀ A P_in, P_outᵀ B P_in⟩ = ⟨A, B⟩``: inner products are
kept in expectation. With ``k = n`` the matrix is orthogonal and the projection exact.

The dimension is split: the sketched parameters get ``dim // 8`` outputs (at most their
number), each factorised weight a share of the rest in proportion to the square root of its
size (at most its size), as ``k_out × k_in``, as square as the layer allows. Exact gradient
norms are computed alongside, by the "ghost norm" ``‖Σ_t δ_t u_tᵀ‖² = Σ_{t,s} (δ_t·δ_s)(u_t·u_s)``
where that takes fewer operations than forming ``W_i`` (few positions, wide layers), and from
``W_i`` otherwise.

At the same ``d`` the factorised projection is noisier than the CountSketch of the whole
gradient: a layer's estimate is a product of two small estimates (``k_out`` and ``k_in``
coordinates), and a Linear layer's per-sample gradient is often of rank one. Measured on the
clustered test problem of ``tests/test_core_index.py`` (8,837 parameters, d = 1024), the
top-10 recall before re-scoring was 0.36 against the CountSketch's 0.60; it pays off where
forming the per-sample gradients is the cost (wide convolutions, see
``benchmarks/scale_build.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tfa_widgets.core.factored import (
    FactoredGradients,
    _ghost_is_cheaper,
    _summed_gradient,
    _unfold,
)
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.numerics import at_least_float32
from tfa_widgets.core.projection import RandomProjector

LOGRA_VERSION = "logra-orthogonal/1"
PROJECTIONS = ("logra", "countsketch")
NARROW_PATCH = 32  # unfolded input channels up to which conv weight norms go by one bmm

Layout = list[tuple[int, int, int]]  # per parameter: (size, out, in); out = in = 0: sketched


def gradient_layout(gradients: GradientModel) -> Layout:
    """Return each selected parameter's ``(size, out, in)``, with ``out = in = 0`` for the
    parameters the factorisation does not cover (biases, BatchNorm, any parameter of a model
    that is not factored).

    Parameters
    ----------
    gradients : GradientModel
        The model whose gradients are projected.

    Returns
    -------
    list of tuple
        One ``(size, out, in)`` per parameter, in the order of ``gradients.names``.
    """
    factored = gradients.factored
    layout = []
    for name, size in zip(gradients.names, gradients.sizes, strict=True):
        module = None
        if factored is not None:
            module_name, kind = factored.owners[name]
            module = factored.modules[module_name] if kind == "weight" else None
        if isinstance(module, nn.Linear | nn.Conv2d):
            out = module.weight.shape[0]
            layout.append((size, out, size // out))
        else:
            layout.append((size, 0, 0))
    return layout


def _orthogonal_columns(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """``sqrt(rows / columns) Q`` with ``Q [rows, columns]`` orthonormal and uniformly random
    (QR of a Gaussian matrix, signs fixed by ``R``'s diagonal so the result is unique)."""
    gaussian = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(torch.float64)
    return q * signs * math.sqrt(rows / columns)


class FactorisedProjector:
    """Project gradients ``[B, P]`` to ``[B, d]`` layer by layer, ``P_outᵀ W P_in``.

    Parameters
    ----------
    layout : list of (size, out, in)
        From `gradient_layout`.
    dim : int
        The requested projected dimension ``d``; `dim` may end a little smaller (rounding of
        the per-layer shares).
    seed : int
        Seed of the random matrices and of the CountSketch.
    """

    def __init__(self, layout: Sequence[tuple[int, int, int]], dim: int, seed: int = 0) -> None:
        self.layout = [tuple(int(v) for v in entry) for entry in layout]
        self.seed = seed
        self.num_params = sum(size for size, _, _ in self.layout)
        layers = [(out, inp) for _, out, inp in self.layout if out]
        other = sum(size for size, out, _ in self.layout if not out)
        other_dim = min(other, max(1, dim // 8)) if other else 0
        shares = _shares([out * inp for out, inp in layers], dim - other_dim)
        self.shapes = [
            _factor_shape(out, inp, share) for (out, inp), share in zip(layers, shares, strict=True)
        ]
        used = sum(k_out * k_in for k_out, k_in in self.shapes)
        other_dim = min(other, dim - used) if other else 0
        self.dim = used + other_dim
        self.sketch_start = used  # the sketch of the other parameters fills the last columns
        generator = torch.Generator().manual_seed(seed)
        self.matrices = [
            (_orthogonal_columns(out, k_out, generator), _orthogonal_columns(inp, k_in, generator))
            for (out, inp), (k_out, k_in) in zip(layers, self.shapes, strict=True)
        ]
        self.sketch = RandomProjector(other, other_dim, seed) if other_dim else None
        self._on: dict = {}

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> list:
        key = (device, dtype)
        if key not in self._on:
            self._on[key] = [
                (p_out.to(device, dtype), p_in.to(device, dtype)) for p_out, p_in in self.matrices
            ]
        return self._on[key]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Return the projections of full gradients: ``[B, d]`` of ``[B, P]``, ``[d]`` of ``[P]``.

        Parameters
        ----------
        grads : torch.Tensor
            Gradients in the order of the layout.

        Returns
        -------
        torch.Tensor
            ``P_outᵀ W P_in`` of each factorised weight, then the sketch of the rest.
        """
        single = grads.dim() == 1
        grads = grads.reshape(-1, self.num_params)
        matrices = iter(self._matrices(grads.device, grads.dtype))
        pieces = grads.split([size for size, _, _ in self.layout], dim=1)
        projected, others = [], []
        for piece, (_, out, inp) in zip(pieces, self.layout, strict=True):
            if out:
                p_out, p_in = next(matrices)
                weight = piece.reshape(-1, out, inp)
                projected.append((p_out.T @ weight @ p_in).flatten(1))
            else:
                others.append(piece)
        if self.sketch is not None:
            projected.append(self.sketch.project(torch.cat(others, dim=1)))
        result = torch.cat(projected, dim=1) if projected else grads.new_zeros(len(grads), 0)
        return result[0] if single else result

    def store_batch(
        self,
        factored: FactoredGradients,
        images: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Write the projected gradients of a batch into ``rows`` ``[B, d]``; return the exact
        gradient norms ``[B]``, both without forming any factorised layer's ``W_i`` where the
        ghost norm is cheaper.

        Parameters
        ----------
        factored : FactoredGradients
            The factorisation of the model the layout was made from.
        images, targets : torch.Tensor
            The batch and its encoded targets.
        rows : torch.Tensor
            The batch's rows of the features, ``[B, dim]``, overwritten.

        Returns
        -------
        torch.Tensor
            The exact gradient norms, ``[B]``, in the dtype of ``rows``.
        """
        images = images.detach().requires_grad_(True)
        inputs, output_grads = factored.layer_terms(images, targets, create_graph=False)
        matrices = iter(self._matrices(images.device, images.dtype))
        shapes = iter(self.shapes)
        squared_norms = rows.new_zeros(rows.shape[0])
        rows[:, self.sketch_start :].zero_()
        column = 0
        sketched = 0
        for name, (size, out, _) in zip(factored.names, self.layout, strict=True):
            module_name, kind = factored.owners[name]
            module = factored.modules[module_name]
            calls = list(zip(inputs[module_name], output_grads[module_name], strict=True))
            if out:
                k_out, k_in = next(shapes)
                p_out, p_in = next(matrices)
                block = rows[:, column : column + k_out * k_in].view(-1, k_out, k_in)
                block.zero_()
                for x, grad in calls:
                    block += _projected_layer_gradient(module, x, grad, p_out, p_in)
                column += k_out * k_in
                squared_norms += _weight_squared_norms(module, kind, calls, len(images))
                continue
            piece = _summed_gradient(module, kind, calls, len(images))
            squared_norms += at_least_float32(piece).square().sum(1)
            if self.sketch is not None:
                self.sketch.accumulate(rows[:, self.sketch_start :], piece, sketched)
            sketched += size
        return squared_norms.sqrt()


def _shares(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` outputs among layers in proportion to the square roots of their sizes,
    none beyond its size (a capped layer's surplus goes to the others)."""
    shares = [0] * len(sizes)
    open_layers = set(range(len(sizes)))
    while open_layers and budget > 0:
        weight = sum(math.sqrt(sizes[i]) for i in open_layers)
        offer = {i: int(budget * math.sqrt(sizes[i]) / weight) for i in open_layers}
        capped = {i for i in open_layers if offer[i] >= sizes[i]}
        if not capped:
            for i in open_layers:
                shares[i] = offer[i]
            break
        for i in capped:
            shares[i] = sizes[i]
            budget -= sizes[i]
        open_layers -= capped
    return shares


def _factor_shape(out: int, inp: int, share: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out k_in <= share``, as square as ``out`` and ``in`` allow."""
    share = max(1, share)
    side = max(1, math.isqrt(share))
    if side >= out:
        return out, max(1, min(inp, share // out))
    if side >= inp:
        return max(1, min(out, share // inp)), inp
    return side, min(inp, share // side)


def _projected_layer_gradient(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor
) -> torch.Tensor:
    """``Σ_t (P_outᵀ δ_t)(P_inᵀ u_t)ᵀ`` for one call of the layer, ``[B, k_out, k_in]``."""
    batch = grad.shape[0]
    if isinstance(module, nn.Linear):
        inputs = x.reshape(batch, -1, x.shape[-1]) @ p_in  # [B, T, k_in]
        outputs = grad.reshape(batch, -1, grad.shape[-1]) @ p_out  # [B, T, k_out]
        return outputs.transpose(1, 2) @ inputs
    filters = p_in.T.reshape(-1, *module.weight.shape[1:])  # P_inᵀ u_t as a convolution
    inputs = F.conv2d(x, filters, None, module.stride, module.padding, module.dilation)
    outputs = torch.matmul(p_out.T, grad.flatten(2))  # [B, k_out, L]
    return torch.bmm(outputs, inputs.flatten(2).transpose(1, 2))


def _weight_squared_norms(
    module: nn.Module, kind: str, calls: list[tuple], batch: int
) -> torch.Tensor:
    """``‖W_i‖²`` of a factorised weight, ``[B]``: by ghost norm where it is cheaper, by one
    batched product where the unfolded input is narrow (a stem convolution on RGB: the grouped
    convolution of `_summed_gradient` took 0.5 s of 6 s of a ResNet-18 batch's norms)."""
    if _ghost_is_cheaper(module, calls):
        x, grad = calls[0]
        patches = _unfold(module, x)  # [B, K, L]
        grad = grad.flatten(2)  # [B, Cout, L]
        grams = torch.bmm(grad.transpose(1, 2), grad) * torch.bmm(patches.transpose(1, 2), patches)
        return at_least_float32(grams).sum((1, 2))
    if isinstance(module, nn.Conv2d) and module.weight[0].numel() <= NARROW_PATCH:
        weights = sum(torch.bmm(g.flatten(2), _unfold(module, x).transpose(1, 2)) for x, g in calls)
        return at_least_float32(weights).square().sum((1, 2))
    return at_least_float32(_summed_gradient(module, kind, calls, batch)).square().sum(1)


def make_projector(
    kind: str, gradients: GradientModel, dim: int, seed: int
) -> FactorisedProjector | RandomProjector:
    """Return the projector of an index: factorised (``"logra"``) where the model is factored,
    else the CountSketch over all parameters.

    Parameters
    ----------
    kind : {"logra", "countsketch"}
        The projection asked for.
    gradients : GradientModel
        The model whose gradients are projected.
    dim, seed : int
        Projected dimension and seed.

    Returns
    -------
    FactorisedProjector or RandomProjector
        The projector; check `projection_kind` of it for what was chosen.
    """
    if kind == "logra" and gradients.factored is not None:
        return FactorisedProjector(gradient_layout(gradients), dim, seed)
    return RandomProjector(gradients.num_params, dim, seed)


def projection_kind(projector: FactorisedProjector | RandomProjector) -> str:
    """Return ``"logra"`` or ``"countsketch"``: which projection ``projector`` is.

    Parameters
    ----------
    projector : FactorisedProjector or RandomProjector
        A projector from `make_projector`.

    Returns
    -------
    str
        The name recorded in an index's metadata.
    """
    return "logra" if isinstance(projector, FactorisedProjector) else "countsketch"
