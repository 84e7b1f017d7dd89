"""Per-sample gradients from one batched backward pass, by per-layer factorisation.

For a layer whose output is ``out = layer(x)``, the gradient of example ``i``'s loss with
respect to the layer's weights is built from that example's input ``x_i`` and output
gradient ``G_i = ∂ℓ_i/∂out_i`` (in eval mode examples are independent, so one backward pass
of ``Σ_i ℓ_i`` gives every ``G_i``):

- Linear: ``W_i = G_iᵀ x_i``, ``b_i = Σ G_i``;
- Conv2d: ``W_i = G_i unfold(x_i)ᵀ``, ``b_i = Σ_positions G_i`` (on the CPU, for outputs of 64
  positions or more, 256 inside the maps' double backward, ``W_i`` is the weight gradient of one
  convolution with the batch as groups);
- BatchNorm2d in eval mode: ``γ_i = Σ_positions x̂_i G_i = (Σ_positions x_i G_i - μ β_i) / σ``,
  ``β_i = Σ_positions G_i``.

This avoids the per-example work of ``vmap`` and runs at close to the speed of a batched
forward and backward pass. Models with other parametrised layers use ``vmap`` instead.

TFA maps need only ``<g_i, g_t>`` and ``‖g_i‖²`` in the autograd graph. Where a conv output
has few positions, these come from ``W_i = G_i U_iᵀ`` (``U_i`` the unfolded input) without
forming ``W_i``: ``<W_i, T> = <G_i, T U_i>`` and ``‖W_i‖² = <G_iᵀ G_i, U_iᵀ U_i>`` (the
"ghost norm"), which takes fewer operations when ``L (K + C_out) < C_out K`` for ``L`` output
positions and ``K`` unfolded input channels.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from tfa_widgets.core.lean_convolution import input_gradient_convolutions


def _conv_supported(module: nn.Conv2d) -> bool:
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return _conv_supported(module)
    return isinstance(module, nn.BatchNorm2d) and module.track_running_stats


def owning_modules(model: nn.Module, names: list[str]) -> dict[str, tuple[str, str]] | None:
    """Map each parameter name to ``(module name, "weight" | "bias")``, or ``None`` if any
    selected parameter sits in a layer this factorisation does not cover."""
    owners = {}
    modules = dict(model.named_modules())
    for name in names:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or kind not in ("weight", "bias") or not _supported(module):
            return None
        owners[name] = (module_name, kind)
    return owners


class FactoredGradients:
    """Computes per-sample gradients of the selected parameters with layer hooks.

    Parameters
    ----------
    model : nn.Module
        The model, in eval mode.
    owners : dict
        From `owning_modules`.
    forward : callable
        Runs the model on a batch with the parameters in use (e.g. via ``functional_call``).
    batch_loss : callable
        Maps ``(logits, targets)`` to the per-example losses ``[B]``.
    """

    def __init__(
        self,
        model: nn.Module,
        owners: dict[str, tuple[str, str]],
        forward: Callable[[torch.Tensor], torch.Tensor],
        batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.names = list(owners)
        self.owners = owners
        self.modules = {m: dict(model.named_modules())[m] for m, _ in owners.values()}
        self.forward = forward
        self.batch_loss = batch_loss

    def layer_terms(self, images: torch.Tensor, targets: torch.Tensor, create_graph: bool):
        """Run forward and backward once; return each layer's inputs and output gradients.

        ``images`` must require grad. With ``create_graph`` the backward pass runs down to them
        and the results stay differentiable with respect to them; without, it stops at the
        layers' outputs: no input gradient of the first layer (the demo model's forward and
        backward over 512 images took 0.46 s instead of 0.50 on one CPU thread).
        """
        inputs: dict[str, list] = {m: [] for m in self.modules}
        outputs: dict[str, list[torch.Tensor]] = {m: [] for m in self.modules}
        output_grads: dict[str, list[torch.Tensor | None]] = {m: [] for m in self.modules}
        edges: list[tuple[str, int, GradientEdge]] = []

        def capture(name: str):
            def keep_gradient(call: int, grad: torch.Tensor) -> None:
                output_grads[name][call] = grad

            def hook(module, args, output):
                x = args[0] if create_graph else args[0].detach()
                inputs[name].append(_layer_input(module, x))
                if create_graph and isinstance(module, nn.BatchNorm2d):
                    output = _batch_norm_as_affine(module, *inputs[name][-1])
                outputs[name].append(output)
                output_grads[name].append(None)
                # The gradient of the value just computed, even if a later in-place operation
                # (ReLU, a residual sum) overwrites the tensor: a tensor hook, or the edge
                # into the node that made it.
                call = len(output_grads[name]) - 1
                if create_graph:
                    output.register_hook(functools.partial(keep_gradient, call))
                else:
                    edges.append((name, call, get_gradient_edge(output)))
                return output

            return hook

        handles = [m.register_forward_hook(capture(n)) for n, m in self.modules.items()]
        lean = input_gradient_convolutions() if create_graph else contextlib.nullcontext()
        try:
            with torch.enable_grad():
                with lean:  # the double backward forms no conv weight gradient
                    losses = self.batch_loss(self.forward(images), targets)
                if create_graph:
                    torch.autograd.grad(losses.sum(), images, create_graph=True)
                elif edges:
                    grads = torch.autograd.grad(
                        losses.sum(), [edge for *_, edge in edges], allow_unused=True
                    )
                    for (name, call, _), grad in zip(edges, grads, strict=True):
                        output_grads[name][call] = grad
        finally:
            for handle in handles:
                handle.remove()
        for name, grads in output_grads.items():  # None: a call the loss does not depend on
            grads[:] = [
                torch.zeros_like(o) if g is None else g
                for g, o in zip(grads, outputs[name], strict=True)
            ]
        return inputs, output_grads

    def _gradient_pieces(
        self, inputs: dict, output_grads: dict, batch: int
    ) -> Iterator[torch.Tensor]:
        for param_name in self.names:
            module_name, kind = self.owners[param_name]
            calls = zip(inputs[module_name], output_grads[module_name], strict=True)
            yield _summed_gradient(self.modules[module_name], kind, calls, batch)

    def per_sample_grad_pieces(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """Yield each selected parameter's per-sample gradients, flattened, ``[B, n_j]``.

        Pieces are computed as they are asked for, so a consumer that reduces each one
        (a norm, a projection) never holds more than one.
        """
        images = images.detach().requires_grad_(True)
        inputs, output_grads = self.layer_terms(images, targets, create_graph=False)
        return self._gradient_pieces(inputs, output_grads, len(images))

    def input_grads_of_score(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        test_grad: torch.Tensor,
        coefficients: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple],
    ) -> torch.Tensor:
        """Return ``∇_{x_i} S_i`` for a score with ``∂S/∂g_i = a_i g_t + c_i g_i``.

        One batched double backward of ``Σ_i a_i <g_i, g_t> + c_i ‖g_i‖² / 2`` with ``a_i``
        and ``c_i`` held fixed at ``coefficients(dots, norms, ‖g_t‖)``: its gradient in
        ``x_i`` is ``∇_x <g_i, v_i>`` for ``v_i = ∂S/∂g_i``, and only the two numbers per
        image enter the graph, never ``g_i`` as ``[B, P]``.
        """
        images = images.detach().requires_grad_(True)
        inputs, output_grads = self.layer_terms(images, targets, create_graph=True)
        sizes = [getattr(self.modules[m], kind).numel() for m, kind in self.owners.values()]
        tests = test_grad.to(images.dtype).split(sizes)
        dots, squares, pieces, piece_tests = [], [], [], []
        with torch.enable_grad():
            for param_name, test in zip(self.names, tests, strict=True):
                module_name, kind = self.owners[param_name]
                module = self.modules[module_name]
                calls = list(zip(inputs[module_name], output_grads[module_name], strict=True))
                if kind == "weight" and _ghost_is_cheaper(module, calls):
                    dot, square = _ghost_conv_weight_terms(module, *calls[0], test)
                    dots.append(dot)
                    squares.append(square)
                else:
                    pieces.append(_summed_gradient(module, kind, calls, len(images)))
                    piece_tests.append(test)
            if pieces:  # one product for all the small blocks
                joined = torch.cat(pieces, dim=1)
                dots.append(joined @ torch.cat(piece_tests))
                squares.append(joined.square().sum(1))
            dots, squares = sum(dots), sum(squares)
            a, c = coefficients(
                dots.detach(), squares.detach().clamp_min(0).sqrt(), test_grad.norm()
            )
            total = (a * dots).sum()
            if c is not None:
                total = total + (c * squares).sum() / 2
        if not total.requires_grad:  # only parameters of layers the forward skips
            return torch.zeros_like(images)
        return torch.autograd.grad(total, images)[0]

    def input_grads_of_preconditioned_score(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        query: torch.Tensor,
        coefficients: Callable[[torch.Tensor, torch.Tensor | None], tuple],
        preconditioner=None,
    ) -> torch.Tensor:
        """Return ``∇_{x_i} S_i`` for a score with ``∂S/∂g_i = a_i q + c_i P g_i``.

        One batched double backward of ``Σ_i a_i <g_i, q> + c_i <g_i, P g_i> / 2`` with
        ``a_i`` and ``c_i`` held fixed at ``coefficients(dots, <g_i, P g_i>)``; ``P`` is
        symmetric, so its gradient in ``x_i`` is ``∇_x <g_i, a_i q + c_i P g_i>``. Without a
        ``preconditioner`` (a score with no ``P g_i`` part) ``coefficients`` gets ``None`` for
        the quadratic form and the dots take the cheaper path of `input_grads_of_score`.
        """
        if preconditioner is None:
            return self.input_grads_of_score(
                images, targets, query, lambda dots, norms, test_norm: coefficients(dots, None)
            )
        images = images.detach().requires_grad_(True)
        inputs, output_grads = self.layer_terms(images, targets, create_graph=True)
        with torch.enable_grad():
            joined = torch.cat(list(self._gradient_pieces(inputs, output_grads, len(images))), 1)
            dots = joined @ query.to(joined.dtype)
            quadratic = (joined * preconditioner.apply(joined)).sum(1)
            a, c = coefficients(dots.detach(), quadratic.detach())
            total = (a * dots).sum()
            if c is not None:
                total = total + (c * quadratic).sum() / 2
        if not total.requires_grad:  # only parameters of layers the forward skips
            return torch.zeros_like(images)
        return torch.autograd.grad(total, images)[0]


def _summed_gradient(
    module: nn.Module, kind: str, calls: Iterable[tuple], batch: int
) -> torch.Tensor:
    """One parameter's per-sample gradients ``[B, n]``, summed over the layer's calls, each
    given as the captured ``(input, output gradient)``; zeros for a layer the forward skips."""
    terms = [_layer_gradient(module, kind, x, grad) for x, grad in calls]
    if not terms:
        parameter = getattr(module, kind)
        return parameter.new_zeros(batch, parameter.numel())
    return functools.reduce(operator.add, terms).flatten(1)


def _ghost_is_cheaper(module: nn.Module, calls: list[tuple]) -> bool:
    """Whether a conv weight called once takes fewer operations by ghost norm (see above)."""
    if not isinstance(module, nn.Conv2d) or len(calls) != 1:
        return False
    grad = calls[0][1]
    positions = grad.shape[-2] * grad.shape[-1]
    patch = module.weight.shape[1:].numel()
    return positions * (patch + module.out_channels) < module.out_channels * patch


def _ghost_conv_weight_terms(
    module: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``<W_i, T>`` as ``<G_i, T U_i>`` and ``‖W_i‖²`` as ``<G_iᵀ G_i, U_iᵀ U_i>``, ``[B]`` each.

    ``T U_i`` is the layer's convolution of ``x_i`` with ``T`` as its weight: with its backward,
    0.5-0.8x the time of unfold + matmul (ResNet-18's third and fourth stages, batch 16, one
    CPU thread).
    """
    along = F.conv2d(
        x, test.view_as(module.weight), None, module.stride, module.padding, module.dilation
    )
    dots = (grad * along).sum((1, 2, 3))
    patches = _unfold(module, x)  # [B, K, L]
    grad = grad.flatten(2)  # [B, Cout, L]
    grams = torch.bmm(grad.transpose(1, 2), grad) * torch.bmm(patches.transpose(1, 2), patches)
    return dots, grams.sum((1, 2))


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)


def _layer_input(module: nn.Module, x: torch.Tensor):
    """What `_layer_gradient` needs of the layer's input, captured during the forward pass."""
    if isinstance(module, nn.BatchNorm2d):
        # The statistics in use now (functional_call may have swapped in a checkpoint's).
        return x, module.running_mean, torch.rsqrt(module.running_var + module.eps)
    return x


def _batch_norm_as_affine(
    module: nn.BatchNorm2d, x: torch.Tensor, mean: torch.Tensor, inverse_std: torch.Tensor
) -> torch.Tensor:
    """Eval-mode BatchNorm as ``x γ/σ + (β − μ γ/σ)``, the same values as the layer's.

    Its first and second derivatives are single products; the native batch-norm double
    backward is general (training statistics too): with it, maps on the demo ResNet ran about
    40 more operations per BatchNorm layer (counted with torch.profiler).
    """
    scale = inverse_std if module.weight is None else module.weight.detach() * inverse_std
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias.detach()
    return torch.addcmul(shift[:, None, None], x, scale[:, None, None])


def _grouped_convolution_is_faster(x: torch.Tensor, grad: torch.Tensor) -> bool:
    # Measured on one CPU thread (demo ResNet, batch 64): the grouped weight gradient takes
    # 0.2-0.7x the time of unfold + bmm where the output has 64 positions or more, and up
    # to 5x as long on a 4x4 output. Differentiated again (maps, batch 8, ``x`` in the graph)
    # it took 0.5x the time at 256 positions, 1.0x at 1024 and 1.1-2.8x at 64. On CUDA
    # unfold + bmm is the measured path.
    positions = grad.shape[-2] * grad.shape[-1]
    return not x.is_cuda and positions >= (256 if x.requires_grad else 64)


def _layer_gradient(module: nn.Module, kind: str, x, grad: torch.Tensor) -> torch.Tensor:
    batch = grad.shape[0]
    if isinstance(module, nn.Linear):
        grad, x = grad.reshape(batch, -1, grad.shape[-1]), x.reshape(batch, -1, x.shape[-1])
        if kind == "bias":
            return grad.sum(1)
        return torch.einsum("blo,bli->boi", grad, x)
    if isinstance(module, nn.Conv2d):
        if kind == "bias":
            return grad.sum((2, 3))
        if _grouped_convolution_is_faster(x, grad):
            return _grouped_conv_weight_gradients(module, x, grad)
        grad = grad.reshape(batch, grad.shape[1], -1)  # [B, Cout, L]
        return torch.bmm(grad, _unfold(module, x).transpose(1, 2))  # [B, Cout, Cin·kh·kw]
    x, mean, inverse_std = x
    bias_grad = grad.sum((2, 3))
    if kind == "bias":
        return bias_grad
    return ((x * grad).sum((2, 3)) - mean * bias_grad) * inverse_std


def _grouped_conv_weight_gradients(
    module: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Per-sample conv weight gradients as the weight gradient of one grouped convolution.

    Stacking the batch along channels, ``[1, B·Cin, H, W]`` convolved with ``B`` groups,
    makes group ``i``'s weight gradient example ``i``'s, ``[B·Cout, Cin, kh, kw]``. Only the
    weight's shape is read, so an expanded placeholder stands in for it.
    """
    batch, channels_in, height, width = x.shape
    channels_out = grad.shape[1]
    placeholder = x.new_empty(1).expand(batch * channels_out, channels_in, *module.kernel_size)
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, batch * channels_out, *grad.shape[2:]),
        x.reshape(1, batch * channels_in, height, width),
        placeholder,
        None,
        module.stride,
        module.padding,
        module.dilation,
        False,
        [0, 0],
        batch,
        [False, True, False],
    )
    return weight_grad.view(batch, channels_out, -1)
