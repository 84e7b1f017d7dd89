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
where that takes fewer operations than forming ``W_i`` (few positions, wide layers; the
inputs' Gram ``(u_t·u_s)`` then comes from the padded input's positions without unfolding it),
and otherwise from ``W_i``, formed once and projected as ``P_outᵀ W_i P_in`` too.

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

from tfa_widgets.core.factored import FactoredGradients, _summed_gradient, _unfold
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
                block = rows[:, column : column + k_out * k_in].view(-1, k_out, k_in)
                squared_norms += _store_layer(module, kind, calls, next(matrices), block)
                column += k_out * k_in
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


def _store_layer(
    module: nn.Module, kind: str, calls: list[tuple], matrices: tuple, block: torch.Tensor
) -> torch.Tensor:
    """Write ``P_outᵀ W_i P_in`` of one factorised weight into ``block`` ``[B, k_out, k_in]``;
    return ``‖W_i‖²`` ``[B]``. Where `_ghost_norm_is_cheaper` the projection comes from the
    projected factors and the norm from the Gram matrices, else both from ``W_i``, formed once
    (projecting a formed ``W_i`` costs little beside forming it)."""
    p_out, p_in = matrices
    if _ghost_norm_is_cheaper(module, calls):
        x, grad = calls[0]
        block.copy_(_projected_layer_gradient(module, x, grad, p_out, p_in))
        return _ghost_squared_norms(module, x, grad)
    weights = _weight_gradients(module, kind, calls, block.shape[0])
    block.copy_(p_out.T @ weights @ p_in)
    return at_least_float32(weights).square().sum((1, 2))


def _weight_gradients(module: nn.Module, kind: str, calls: list[tuple], batch: int) -> torch.Tensor:
    """``W_i`` ``[B, out, in]``: by one batched product where the unfolded input is narrow (a
    stem convolution on RGB: the grouped convolution of `_summed_gradient` took 0.5 s of 6 s
    of a ResNet-18 batch's norms), else as `_summed_gradient`."""
    out = module.weight.shape[0]
    if isinstance(module, nn.Conv2d) and module.weight[0].numel() <= NARROW_PATCH:
        return sum(torch.bmm(g.flatten(2), _unfold(module, x).transpose(1, 2)) for x, g in calls)
    return _summed_gradient(module, kind, calls, batch).view(batch, out, -1)


def _ghost_norm_is_cheaper(module: nn.Module, calls: list[tuple]) -> bool:
    """Whether a conv weight called once takes fewer operations by ghost norm than by forming
    ``W_i`` (``C_out K L`` per image): the ghost norm's Gram matrices cost ``C_out L²`` and
    `_input_gram`'s cheaper way, counted twice (products of small matrices and a gather ran at
    about half the rate of the weight gradient on a 2-core CPU, ResNet-18 layers)."""
    if not isinstance(module, nn.Conv2d) or len(calls) != 1:
        return False
    x, grad = calls[0]
    positions = grad.shape[-2] * grad.shape[-1]
    patch = module.weight.shape[1:].numel()
    ghost = module.out_channels * positions**2 + min(_gram_costs(module, x, positions))
    return 2 * ghost < module.out_channels * patch * positions


def _gram_costs(module: nn.Conv2d, x: torch.Tensor, positions: int) -> tuple[int, int]:
    """Operations of ``UᵀU`` ``[L, L]`` from the unfolded input ``U`` ``[K, L]`` and from the
    Gram matrix of the padded input's positions (see `_input_gram`)."""
    patch = module.weight.shape[1:].numel()
    taps = module.weight.shape[2:].numel()
    padded = (x.shape[-2] + 2 * module.padding[0]) * (x.shape[-1] + 2 * module.padding[1])
    return patch * positions**2, x.shape[1] * padded**2 + taps * positions**2


def _ghost_squared_norms(module: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖² = ⟨G_iᵀ G_i, U_iᵀ U_i⟩`` ``[B]`` for ``W_i = G_i U_iᵀ`` (the ghost norm)."""
    output_shape = grad.shape[-2:]
    grad = at_least_float32(grad.flatten(2))  # [B, C_out, L]
    unfolded, raw = _gram_costs(module, x, grad.shape[-1])
    if raw < unfolded:
        inputs = _input_gram(module, at_least_float32(x), output_shape)
    else:
        patches = at_least_float32(_unfold(module, x))  # [B, K, L]
        inputs = torch.bmm(patches.transpose(1, 2), patches)
    return (torch.bmm(grad.transpose(1, 2), grad) * inputs).sum((1, 2))


def _input_gram(module: nn.Conv2d, x: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
    """``UᵀU`` ``[B, L, L]`` of the unfolded input without unfolding it.

    Output position ``t`` reads padded input position ``s_t + o_k`` through kernel tap ``k``
    (``s_t`` its window's corner, ``o_k`` the tap's offset), so
    ``(UᵀU)[t, u] = Σ_k X[s_t + o_k, s_u + o_k]`` with ``X`` ``[P, P]`` the inner products of
    the padded input's positions over channels: ``C_in P²`` operations and a gather, instead of
    ``K L²`` and an unfolded copy (``K = C_in × taps``), where the output has few positions.
    """
    (pad_h, pad_w), (stride_h, stride_w) = module.padding, module.stride
    (dilation_h, dilation_w), (taps_h, taps_w) = module.dilation, module.kernel_size
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    width = padded.shape[-1]
    flat = padded.flatten(2)  # [B, C_in, P]
    gram = torch.bmm(flat.transpose(1, 2), flat).flatten(1)  # [B, P²]
    rows, columns = (torch.arange(n, device=x.device) for n in output_shape)
    corners = (rows[:, None] * stride_h * width + columns * stride_w).flatten()  # [L]
    tap_rows, tap_columns = (torch.arange(n, device=x.device) for n in (taps_h, taps_w))
    offsets = (tap_rows[:, None] * dilation_h * width + tap_columns * dilation_w).flatten()
    read = corners + offsets[:, None]  # [taps, L]
    index = read[:, :, None] * flat.shape[-1] + read[:, None, :]  # [taps, L, L]
    gathered = gram.index_select(1, index.flatten())
    return gathered.view(len(x), len(offsets), *index.shape[1:]).sum(1)


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
