"""The per-layer arithmetic of a K-FAC fit: layer inputs as patches, covariances, rotations.

A layer call gives ``u [B, L, K]`` (its inputs at the ``L`` output positions) and
``δ [B, L, out]`` (the loss gradients there), from which `tfa_widgets.core.kfac` forms
``A = Σ u uᵀ``, ``S = Σ δ δᵀ`` and each example's rotated gradient ``Q_Sᵀ G_i Q_A`` with
``G_i = Σ_p δ_p u_pᵀ``.

A conv's patches are copied once from a strided view of the zero-padded input in channels-last
layout, so each patch is ordered (kernel row, kernel column, input channel) rather than the
weight's (input channel, kernel row, kernel column); `patch_order` maps one to the other. On
one CPU thread this copy took 0.2-0.4x the time of ``unfold`` and the transpose to ``[B, L, K]``
on the demo model's layers (batch 64), and the contiguous result turns ``u Q_A`` into one
matrix product instead of a batched one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def layer_positions(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, weight: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(u [B, L, K], δ [B, L, out])`` of one call of a Linear or Conv2d layer: ``u``
    contiguous, holding the weight's columns in `patch_order` (an empty ``[B, L, 0]`` when
    the weight is not selected), without the bias's column of ones; ``δ`` a view of a conv's
    gradient (``δᵀ`` is contiguous, as products over the positions want it)."""
    batch = grad.shape[0]
    if isinstance(module, nn.Conv2d):
        delta = grad.permute(0, 2, 3, 1).reshape(batch, -1, grad.shape[1])
        u = _patches(module, x) if weight else x.new_zeros(batch, delta.shape[1], 0)
        return u, delta
    u = x.reshape(batch, -1, x.shape[-1]).contiguous()
    delta = grad.reshape(batch, -1, grad.shape[-1]).contiguous()
    return (u if weight else u[..., :0]), delta


def patch_order(module: nn.Module, weight: bool, bias: bool) -> torch.Tensor:
    """Return the weight column (with the bias last) of each column of `layer_positions`' ``u``."""
    if not weight:
        order = torch.arange(0)
    elif isinstance(module, nn.Conv2d):
        channels, rows, columns = module.weight.shape[1:]
        order = torch.arange(channels * rows * columns).view(channels, rows, columns)
        order = order.permute(1, 2, 0).flatten()
    else:
        order = torch.arange(module.weight.shape[1])
    if bias:
        order = torch.cat([order, torch.tensor([len(order)])])
    return order


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The conv's input patches ``[B, L, kh·kw·C_in]`` in (row, column, channel) order."""
    batch, channels, height, width = x.shape
    (kernel_h, kernel_w), (stride_h, stride_w) = module.kernel_size, module.stride
    (pad_h, pad_w), (dilation_h, dilation_w) = module.padding, module.dilation
    if pad_h == pad_w == 0:  # a view: the one copy below reads the input in place
        padded = x.permute(0, 2, 3, 1)
    else:
        padded = x.new_zeros(batch, height + 2 * pad_h, width + 2 * pad_w, channels)
        padded[:, pad_h : pad_h + height, pad_w : pad_w + width] = x.permute(0, 2, 3, 1)
    out_h = (padded.shape[1] - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (padded.shape[2] - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    step_b, step_h, step_w, step_c = padded.stride()
    view = padded.as_strided(
        (batch, out_h, out_w, kernel_h, kernel_w, channels),
        (step_b, step_h * stride_h, step_w * stride_w, step_h * dilation_h,
         step_w * dilation_w, step_c),
    )  # fmt: skip
    return view.reshape(batch, out_h * out_w, -1)


def input_products(u: torch.Tensor, bias: bool) -> torch.Tensor:
    """``Σ_p u_p u_pᵀ`` of the inputs ``[B, L, K]``, with the bias's column of ones appended
    without forming it: ``[[UᵀU, Uᵀ1], [1ᵀU, BL]]``."""
    flat = u.flatten(0, 1)
    products = symmetric_products(flat)
    if not bias:
        return products
    column = flat.sum(0)
    corner = column.new_full((1,), len(flat))
    return torch.cat([torch.cat([products, column[:, None]], 1), torch.cat([column, corner])[None]])


def symmetric_products(flat: torch.Tensor) -> torch.Tensor:
    """Return ``flatᵀ flat`` ``[K, K]``: the upper half of its rows formed, the rest mirrored.

    Three quarters of the multiply-adds where ``K >= 64``: the demo fit's input covariances
    (``K`` = 144 and 288, 1024-16384 rows a batch) took 0.27 s instead of 0.35 on one CPU
    thread.
    """
    columns = flat.shape[1]
    if columns < 64:
        return flat.mT @ flat
    half = columns // 2
    products = flat.new_empty(columns, columns)
    torch.mm(flat[:, :half].mT, flat, out=products[:half])
    torch.mm(flat[:, half:].mT, flat[:, half:], out=products[half:, half:])
    products[half:, :half] = products[:half, half:].mT
    return products


class InputCovariance:
    """``Σ_i Σ_p u_ip u_ipᵀ`` of one layer over batches, in `patch_order` (the bias's ones last).

    A conv called once per forward whose whole input is small (`gram_is_cheaper`) sums the Gram
    matrix of its inputs, ``Σ_i x_i x_iᵀ``, and gathers the patches' products from it once, in
    `total`: ``(C·H·W)²`` multiply-adds per example instead of ``L K²``, a fifth on the demo's
    last stage (4x4 inputs; measured on one CPU thread, batch 64: 2.1 ms per batch instead of
    7). Other layers sum the products of their patches.
    """

    def __init__(self, module: nn.Module, bias: bool) -> None:
        self.module, self.bias = module, bias
        self.products: torch.Tensor | int = 0
        self.gram: torch.Tensor | int = 0
        self.input_sum: torch.Tensor | int = 0  # Σ_i x_i, for the bias's column
        self.input_shape: torch.Size | None = None
        self.positions = 0  # positions summed into the Gram matrix

    def add(self, u: torch.Tensor, x: torch.Tensor | None) -> None:
        """Add a batch's patches ``u [B, L, K]`` (``x``: the conv's input when called once)."""
        if (
            x is not None
            and self.input_shape in (None, x.shape[1:])
            and gram_is_cheaper(self.module, x[0].numel(), u.shape[1], u.shape[-1])
        ):
            flat = x.flatten(1)
            if isinstance(self.gram, torch.Tensor):
                self.gram.addmm_(flat.mT, flat)
            else:
                self.gram = flat.mT @ flat
            self.input_sum = self.input_sum + flat.sum(0)
            self.input_shape, self.positions = x.shape[1:], self.positions + u[..., 0].numel()
            return
        self.products = self.products + input_products(u, self.bias)

    def total(self) -> torch.Tensor:
        """Return the sum ``[K (+1), K (+1)]``."""
        if self.input_shape is None:
            return self.products
        pixels = _patch_pixels(self.module, *self.input_shape[1:])  # [L, kh·kw]
        channels, size = self.input_shape[0], self.input_shape[1:].numel()
        taps = pixels.shape[1]
        # counts[(a, b), (q, r)]: the positions whose taps a and b read input pixels q and r
        inside = (pixels[:, :, None] < size) & (pixels[:, None, :] < size)
        pixel_pairs = (pixels[:, :, None] * size + pixels[:, None, :])[inside]
        tap_pairs = torch.arange(taps * taps).view(taps, taps).expand_as(inside)[inside]
        counts = self.gram.new_zeros(taps * taps, size * size)
        counts.index_put_((tap_pairs, pixel_pairs), counts.new_ones(()), accumulate=True)
        gram = self.gram.view(channels, size, channels, size).permute(1, 3, 0, 2)
        products = counts @ gram.reshape(size * size, channels * channels)
        products = products.view(taps, taps, channels, channels).permute(0, 2, 1, 3)
        products = products.reshape(taps * channels, -1)
        if self.bias:
            sums = torch.cat(
                [self.input_sum.view(channels, size), products.new_zeros(channels, 1)], 1
            )
            column = sums[:, pixels].sum(1).mT.flatten()  # Σ_p u_p in (row, column, channel)
            corner = column.new_full((1,), self.positions)
            products = torch.cat(
                [torch.cat([products, column[:, None]], 1), torch.cat([column, corner])[None]]
            )
        return products + self.products


def gram_is_cheaper(module: nn.Module, size: int, positions: int, columns: int) -> bool:
    """Whether a conv's ``Σ_p u_p u_pᵀ`` takes at most half the multiply-adds per example from
    the Gram matrix of its whole input (``size = C·H·W``) as from its patches, ``L K²``."""
    return isinstance(module, nn.Conv2d) and 2 * size * size <= positions * columns * columns


def _patch_pixels(module: nn.Conv2d, height: int, width: int) -> torch.Tensor:
    """The input pixel ``y·W + x`` under each patch position, ``[L, kh·kw]`` in `_patches`'
    (row, column) order; ``H·W`` where the patch lies on the zero padding."""
    (kernel_h, kernel_w), (stride_h, stride_w) = module.kernel_size, module.stride
    (pad_h, pad_w), (dilation_h, dilation_w) = module.padding, module.dilation
    out_h = (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    rows = torch.arange(out_h)[:, None] * stride_h + torch.arange(kernel_h) * dilation_h - pad_h
    cols = torch.arange(out_w)[:, None] * stride_w + torch.arange(kernel_w) * dilation_w - pad_w
    rows, cols = rows[:, None, :, None], cols[None, :, None, :]  # [out_h, out_w, kh, kw]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    pixels = torch.where(inside, rows * width + cols, height * width)
    return pixels.reshape(out_h * out_w, kernel_h * kernel_w)


def inputs_are_rotated_first(positions: int, out: int, columns: int) -> bool:
    """Whether ``(δ Q_S)ᵀ (u Q_A)`` takes fewer multiply-adds than ``Q_Sᵀ G Q_A``.

    ``L (out² + K²)`` against ``out K (out + K)`` per example: true for a Linear layer and a
    conv with few positions (the demo's last stage, ``L = 16``, takes a quarter).
    """
    return positions * (out * out + columns * columns) <= out * columns * (out + columns)


def kept_terms(u: torch.Tensor, delta: torch.Tensor, bias: bool):
    """What a batch keeps of a layer for the rotation: ``(u, δ)`` where rotating them first is
    cheaper (`inputs_are_rotated_first`), else the gradients ``G_i = Σ_p δ_p [u_p; 1]ᵀ``."""
    if inputs_are_rotated_first(delta.shape[1], delta.shape[-1], u.shape[-1] + bias):
        return u, delta
    grads = torch.bmm(delta.mT, u)
    if not bias:
        return grads
    return torch.cat([grads, delta.sum(1)[..., None]], -1)


class RotatedSquares:
    """``(Q_Sᵀ G_i Q_A)²`` of one batch's `kept_terms` piece, ``[B, out·K]``, chunk by chunk.

    Gradients ``G_i`` are rotated and squared in their own memory. Inputs and output gradients
    are rotated (``u Q_A``, ``δ Q_S``: the size of ``u`` and ``δ``) and their squared products
    formed again, a few examples at a time in one buffer, each time `chunks` is read: the
    squares (``out·K`` per example, 3.6x the rotated terms on the demo's last stage) are never
    held whole, so a fit touches no fresh memory for them: a demo fit (500 images, one CPU
    thread) that held them took 65k page faults and 0.12-0.14 s of system time.

    Parameters
    ----------
    piece : tensor or (tensor, tensor)
        From `kept_terms`; the gradients are overwritten.
    q_a, q_s : tensor
        The eigenvectors, ``Q_A`` in `patch_order`, in the piece's dtype.
    """

    #: Elements of the buffer of squared products (2 MB of float32: it stays in the cache).
    CHUNK_ELEMENTS = 2**19

    def __init__(self, piece, q_a: torch.Tensor, q_s: torch.Tensor) -> None:
        if isinstance(piece, tuple):  # (δ Q_S)ᵀ ([u | 1] Q_A), u without the ones
            u, delta = piece
            rotated_u = (u.flatten(0, 1) @ q_a[: u.shape[-1]]).view(*u.shape[:2], -1)
            if len(q_a) > u.shape[-1]:  # the bias's column of ones
                rotated_u += q_a[-1]
            self.rotated = ((delta @ q_s).mT.contiguous(), rotated_u)  # [B, out, L], [B, L, K]
            return
        left = q_s.mT @ piece  # [B, out, K]
        torch.mm(left.flatten(0, 1), q_a, out=piece.flatten(0, 1))
        self.rotated = piece.square_().flatten(1)

    def chunks(self) -> Iterator[torch.Tensor]:
        """Yield the squares ``[c, out·K]`` of consecutive examples (a buffer reused for the
        next chunk: use each before asking for the next)."""
        if isinstance(self.rotated, torch.Tensor):
            yield self.rotated
            return
        delta, u = self.rotated
        size = delta.shape[1] * u.shape[-1]
        step = max(1, self.CHUNK_ELEMENTS // size)
        buffer = u.new_empty(min(step, len(u)), delta.shape[1], u.shape[-1])
        for start in range(0, len(u), step):
            pieces = delta[start : start + step], u[start : start + step]
            products = torch.bmm(*pieces, out=buffer[: len(pieces[0])])
            yield products.square_().flatten(1)
