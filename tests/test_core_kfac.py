"""K-FAC / EK-FAC factors against the explicit Fisher of tiny float64 models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from smooth_models import images_and_labels, smooth_cnn
from torch import nn

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.kfac import KFACPreconditioner, KFACSettings, fit_kfac
from tfa_widgets.core.kfac_terms import (
    InputCovariance,
    RotatedSquares,
    layer_positions,
    patch_order,
    symmetric_products,
)

# float64 sums of a few hundred products of O(1) numbers: rounding is ~1e-14 of their scale, so
# 1e-10 relative to the largest entry compared leaves four orders of margin on any BLAS.
RTOL = 1e-10


def layer_gradient_matrices(model, module: nn.Module, images, labels) -> torch.Tensor:
    """Each example's ``[dW | db]`` of ``module`` by a per-example backward, ``[N, out, K]``."""
    rows = []
    for image, label in zip(images, labels, strict=True):
        loss = F.cross_entropy(model(image[None]), label[None])
        weight, bias = torch.autograd.grad(loss, [module.weight, module.bias])
        rows.append(torch.cat([weight.flatten(1), bias[:, None]], 1))
    return torch.stack(rows)


def explicit_fisher(matrices: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_i vec(G_i) vec(G_i)ᵀ`` with row-major ``vec``."""
    flat = matrices.flatten(1)
    return flat.T @ flat / len(flat)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual, expected, rtol=0, atol=RTOL * float(expected.abs().max()))


def test_kfac_equals_the_explicit_fisher_when_every_example_has_the_same_input():
    # One position per example and one shared input u: F = (1/N) Σ δ_i δ_iᵀ ⊗ u uᵀ = S ⊗ A.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double().eval()
    images = torch.randn(1, 4, dtype=torch.float64).expand(50, 4)
    labels = torch.randint(0, 3, (50,))
    preconditioner = fit_kfac(model, ["weight", "bias"], [(images, labels)], progress=False)
    (layer,) = preconditioner.layers
    fisher = explicit_fisher(layer_gradient_matrices(model, model, images, labels))
    assert close(torch.kron(layer.gradient_covariance, layer.activation_covariance), fisher)
    # ...and EK-FAC's corrected eigenvalues are then K-FAC's: the basis diagonalises F exactly.
    kfac = layer.gradient_covariance, layer.activation_covariance
    sigma, alpha = torch.linalg.eigvalsh(kfac[0]), torch.linalg.eigvalsh(kfac[1])
    assert torch.allclose(
        layer.eigenvalues.flatten().sort().values,
        torch.kron(sigma, alpha).sort().values,
        rtol=0,
        atol=RTOL * float(layer.eigenvalues.max()),
    )


@pytest.mark.parametrize("index", [0, 2, 5])
def test_factors_are_the_input_and_output_gradient_covariances(index):
    # A = (1/N) Σ_i Σ_p u_ip u_ipᵀ from the layer's unfolded inputs (with a ones column for the
    # bias), S = (1/(N L)) Σ_i Σ_p δ_ip δ_ipᵀ from the output gradients of Σ_i ℓ_i.
    model = smooth_cnn()
    images, labels = images_and_labels(12)
    preconditioner = fit_kfac(
        model,
        [n for n, _ in model.named_parameters()],
        [(images[:5], labels[:5]), (images[5:], labels[5:])],
        progress=False,
    )
    layer = next(f for f in preconditioner.layers if f.module == str(index))
    module = model[index]
    with torch.no_grad():
        inputs = model[:index](images)
    outputs = model[: index + 1](images).detach().requires_grad_(True)
    loss = F.cross_entropy(model[index + 1 :](outputs), labels, reduction="sum")
    (deltas,) = torch.autograd.grad(loss, outputs)
    if isinstance(module, nn.Conv2d):
        u = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        u, deltas = u.mT, deltas.flatten(2).mT
    else:
        u, deltas = inputs[:, None], deltas[:, None]
    u = torch.cat([u, torch.ones_like(u[..., :1])], -1)
    positions = deltas.shape[1]
    assert close(layer.activation_covariance, torch.einsum("npk,npj->kj", u, u) / 12)
    expected_s = torch.einsum("npo,npq->oq", deltas, deltas) / (12 * positions)
    assert close(layer.gradient_covariance, expected_s)


@pytest.mark.parametrize("index", [0, 2, 5])
def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_eigenbasis(index):
    model = smooth_cnn()
    images, labels = images_and_labels(10)
    preconditioner = fit_kfac(
        model, [n for n, _ in model.named_parameters()], [(images, labels)], progress=False
    )
    layer = next(f for f in preconditioner.layers if f.module == str(index))
    fisher = explicit_fisher(layer_gradient_matrices(model, model[index], images, labels))
    basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)
    diagonal = torch.diagonal(basis.T @ fisher @ basis).reshape(layer.eigenvalues.shape)
    assert close(layer.eigenvalues, diagonal)


def test_kfac_inverse_is_the_damped_inverse_of_the_kronecker_product():
    model = smooth_cnn()
    images, labels = images_and_labels(10)
    names = [n for n, _ in model.named_parameters()]
    settings = KFACSettings(eigenvalue_correction=False)
    preconditioner = fit_kfac(model, names, [(images, labels)], settings=settings, progress=False)
    grads = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    result = preconditioner.apply(grads)
    for layer in preconditioner.layers:
        module = model[int(layer.module)]
        damping = preconditioner.damping(layer)
        # The stated default: 0.1 times the layer's mean eigenvalue, kronfluence's heuristic.
        assert damping == pytest.approx(0.1 * float(layer.eigenvalues.mean()), rel=1e-12)
        curvature = torch.kron(layer.gradient_covariance, layer.activation_covariance)
        damped = curvature + damping * torch.eye(len(curvature), dtype=torch.float64)
        weight, bias = (preconditioner._slice(n) for n in (layer.weight, layer.bias))
        layer_grads = torch.cat(
            [
                grads[:, weight].unflatten(
                    1,
                    (
                        module.out_channels
                        if isinstance(module, nn.Conv2d)
                        else module.out_features,
                        -1,
                    ),
                ),
                grads[:, bias, None],
            ],
            -1,
        )
        expected = torch.linalg.solve(damped, layer_grads.flatten(1).T).T.reshape(layer_grads.shape)
        assert close(result[:, weight], expected[..., :-1].flatten(1))
        assert close(result[:, bias], expected[..., -1])


def test_true_fisher_samples_labels_from_the_model():
    # Shared input: E_y[δδᵀ] = diag(p) − p pᵀ for cross-entropy with labels y ~ softmax. Each
    # entry of the Monte Carlo mean over 4000 draws has a standard deviation below 0.5/√4000
    # = 0.008; 0.04 is five of them. The empirical Fisher with all labels 0 is far from it.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double().eval()
    images = torch.randn(1, 4, dtype=torch.float64).expand(4000, 4)
    labels = torch.zeros(4000, dtype=torch.long)
    p = model(images[:1]).softmax(-1)[0]
    expected = torch.diag(p) - torch.outer(p, p)
    true = fit_kfac(
        model, ["weight"], [(images, labels)], settings=KFACSettings(fisher="true"), progress=False
    )
    empirical = fit_kfac(model, ["weight"], [(images, labels)], progress=False)
    assert (true.layers[0].gradient_covariance - expected).abs().max() < 0.04
    assert (empirical.layers[0].gradient_covariance - expected).abs().max() > 0.1


def test_layers_it_does_not_factor_are_left_out_with_a_warning():
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3))
        .double()
        .eval()
    )
    images, labels = images_and_labels(6)
    names = [n for n, _ in model.named_parameters()]
    with pytest.warns(UserWarning, match="leaves out 2 selected parameters"):
        preconditioner = fit_kfac(model, names, [(images, labels)], progress=False)
    grads = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    result = preconditioner.apply(grads)
    for name in ("1.weight", "1.bias"):
        assert torch.all(result[preconditioner._slice(name)] == 0)
    assert result[preconditioner._slice("3.weight")].abs().sum() > 0
    with pytest.raises(InputError, match="none of the selected parameters"):
        fit_kfac(model, ["1.weight"], [(images, labels)], progress=False)


def test_bad_settings_and_empty_data_are_named():
    with pytest.raises(InputError, match="unknown Fisher"):
        KFACSettings(fisher="exact")
    with pytest.raises(InputError, match="damping"):
        KFACSettings(damping=-1.0)
    model = nn.Linear(4, 3).double().eval()
    with pytest.raises(InputError, match="empty training set"):
        fit_kfac(model, ["weight"], [], progress=False)


def test_factors_survive_a_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = smooth_cnn()
    images, labels = images_and_labels(6)
    names = ["0.weight", "2.weight", "2.bias", "5.weight"]  # 0.bias and 5.bias left unselected
    fitted = fit_kfac(model, names, [(images, labels)], progress=False)
    save_file(fitted.tensors(), tmp_path / "factors.safetensors")
    loaded = KFACPreconditioner.from_tensors(
        load_file(tmp_path / "factors.safetensors"), fitted.names, fitted.sizes, fitted.settings
    )
    assert [(f.module, f.weight, f.bias) for f in loaded.layers] == [
        ("0", "0.weight", None),
        ("2", "2.weight", "2.bias"),
        ("5", "5.weight", None),
    ]
    for mine, theirs in zip(fitted.layers, loaded.layers, strict=True):
        assert torch.equal(mine.eigenvalues, theirs.eigenvalues)  # stored bytes, not recomputed
        assert torch.equal(mine.activation_eigenvectors, theirs.activation_eigenvectors)
    grads = torch.randn(2, sum(fitted.sizes), dtype=torch.float64)
    assert close(loaded.apply(grads), fitted.apply(grads))


def per_example_flat_gradients(model, names, images, labels) -> torch.Tensor:
    """``g_i`` of the selected parameters by a float64 per-example backward, ``[N, P]``."""
    parameters = dict(model.named_parameters())
    rows = []
    for image, label in zip(images, labels, strict=True):
        loss = F.cross_entropy(model(image[None]), label[None])
        grads = torch.autograd.grad(loss, [parameters[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.portability
def test_one_pass_fit_equals_the_two_pass_fit_and_forms_the_explicit_self_scores():
    # Three batches: the kept per-example gradients are rotated after the pass, batch by batch.
    model = smooth_cnn()
    images, labels = images_and_labels(12)
    names = [n for n, _ in model.named_parameters()]
    batches = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]
    kept = fit_kfac(model, names, batches, progress=False)
    passes = fit_kfac(model, names, batches, progress=False, keep_mb=0)
    assert passes.training_terms is None
    for one, two in zip(kept.layers, passes.layers, strict=True):
        assert close(one.eigenvalues, two.eigenvalues)
    self_scores, probabilities = kept.training_terms
    grads = per_example_flat_gradients(model, names, images, labels)
    assert close(self_scores, (grads * kept.apply(grads)).sum(1))
    with torch.no_grad():
        expected = model(images).softmax(-1).gather(1, labels[:, None])[:, 0]
    assert close(probabilities, expected)
    # The true Fisher's gradients come from sampled labels: its self-scores are not formed.
    true = fit_kfac(model, names, batches, settings=KFACSettings(fisher="true"), progress=False)
    assert true.training_terms is None


def test_fit_reads_the_logits_through_output():
    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict:
            return {"scores": self.inner(x)}

    model = smooth_cnn()
    images, labels = images_and_labels(6)
    names = [n for n, _ in model.named_parameters()]
    plain = fit_kfac(model, names, [(images, labels)], progress=False)
    wrapped = Wrapped(model)
    wrapped_names = [f"inner.{n}" for n in names]
    with pytest.raises(InputError, match="scores"):
        fit_kfac(wrapped, wrapped_names, [(images, labels)], progress=False)
    read = fit_kfac(
        wrapped,
        wrapped_names,
        [(images, labels)],
        progress=False,
        output=lambda raw: raw["scores"],
    )
    for one, two in zip(plain.layers, read.layers, strict=True):
        assert close(two.eigenvalues, one.eigenvalues)
    assert close(read.training_terms[0], plain.training_terms[0])


def dilated_cnn() -> nn.Module:
    """Rectangular kernels, strides, paddings and dilations; a conv and a Linear without bias.

    The first conv (24 positions) rotates its gradients ``G_i``, the second (2 positions) and
    the Linear layer their inputs and output gradients (`inputs_are_rotated_first`).
    """
    torch.manual_seed(2)
    return (
        nn.Sequential(
            nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
            nn.Tanh(),
            nn.Conv2d(6, 4, 3, stride=(2, 4), padding=1, dilation=(2, 1), bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3, bias=False),
        )
        .double()
        .eval()
    )


@pytest.mark.portability
@pytest.mark.parametrize("keep_mb", [1.0, 0.0])
@pytest.mark.parametrize("chunk_elements", [RotatedSquares.CHUNK_ELEMENTS, 1])
def test_strided_dilated_layers_and_layers_without_bias_match_the_explicit_fisher(
    keep_mb, chunk_elements, monkeypatch
):
    # One pass (the terms kept) and three passes (keep_mb=0): A against the unfolded inputs,
    # the EK-FAC eigenvalues against the explicit Fisher's diagonal in the Kronecker eigenbasis
    # and ⟨g_i, H⁻¹ g_i⟩ against per-example float64 gradients; with chunk_elements=1 the
    # squared products of rotated inputs come one example at a time through one buffer.
    monkeypatch.setattr(RotatedSquares, "CHUNK_ELEMENTS", chunk_elements)
    model = dilated_cnn()
    images, labels = images_and_labels(9)
    names = [n for n, _ in model.named_parameters()]
    batches = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    fitted = fit_kfac(model, names, batches, progress=False, keep_mb=keep_mb)
    assert (fitted.training_terms is None) == (keep_mb == 0)
    grads = per_example_flat_gradients(model, names, images, labels)
    for layer in fitted.layers:
        index = int(layer.module)
        module = model[index]
        with torch.no_grad():
            inputs = model[:index](images)
        if isinstance(module, nn.Conv2d):
            u = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
            u = u.mT
        else:
            u = inputs[:, None]
        matrices = grads[:, fitted._slice(layer.weight)].unflatten(1, (module.weight.shape[0], -1))
        if layer.bias is not None:
            u = torch.cat([u, torch.ones_like(u[..., :1])], -1)
            matrices = torch.cat([matrices, grads[:, fitted._slice(layer.bias), None]], -1)
        assert close(layer.activation_covariance, torch.einsum("npk,npj->kj", u, u) / 9)
        basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors)
        diagonal = torch.diagonal(basis.T @ explicit_fisher(matrices) @ basis)
        assert close(layer.eigenvalues, diagonal.reshape(layer.eigenvalues.shape))
    expected = (grads * fitted.apply(grads)).sum(1)
    if keep_mb:
        assert close(fitted.training_terms[0], expected)
    else:
        assert close(fitted.quadratic_forms(model, images, labels, "cross_entropy"), expected)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 3, 3, padding=1),
        nn.Conv2d(4, 3, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    ],
)
def test_input_covariance_from_the_gram_matrix_is_the_sum_of_patch_products(conv):
    # Convs on 3x3 inputs gather A from Σ_i x_i x_iᵀ: against Σ_p u_p u_pᵀ of torch's unfold
    # (with the bias's ones), summed over two batches.
    conv = conv.double()
    bias = conv.bias is not None
    images = torch.randn(
        5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    covariance = InputCovariance(conv, bias)
    for batch in (images[:2], images[2:]):
        u, _ = layer_positions(conv, batch, conv(batch).detach(), weight=True)
        covariance.add(u, batch)
    assert covariance.input_shape is not None  # the Gram path was taken
    weight_order = patch_order(conv, True, bias).argsort()
    actual = covariance.total()[weight_order][:, weight_order]
    u = F.unfold(images, conv.kernel_size, conv.dilation, conv.padding, conv.stride).mT
    if bias:
        u = torch.cat([u, torch.ones_like(u[..., :1])], -1)
    assert close(actual, torch.einsum("npk,npj->kj", u, u))


# float32 rounding (unit 6e-8) over the longest product of a rotated gradient, K + out <= 31
# terms here, doubled by the square: 4e-6 of the largest entry; 1e-5 bounds it with margin,
# while eigenvectors paired with the wrong eigenvalues or columns are off by O(1).
FLOAT32_RTOL = 1e-5


@pytest.mark.portability
@pytest.mark.parametrize("make_model", [smooth_cnn, dilated_cnn])
def test_float32_fit_decomposes_in_float32_and_matches_the_float64_fisher(make_model):
    # The factors of a float32 model are decomposed in float32: EK-FAC's eigenvalues must still
    # be the float64 explicit Fisher's diagonal in the fitted basis, and the self-scores the
    # float64 ⟨g_i, H⁻¹ g_i⟩ with those factors.
    model = make_model()
    images, labels = images_and_labels(12)
    names = [n for n, _ in model.named_parameters()]
    batches = [(images[i : i + 4].float(), labels[i : i + 4]) for i in range(0, 12, 4)]
    fitted = fit_kfac(copy.deepcopy(model).float(), names, batches, progress=False)
    grads = per_example_flat_gradients(model, names, images, labels)
    for layer in fitted.layers:
        assert layer.activation_eigenvectors.dtype == torch.float32
        module = model[int(layer.module)]
        matrices = grads[:, fitted._slice(layer.weight)].unflatten(1, (module.weight.shape[0], -1))
        if layer.bias is not None:
            matrices = torch.cat([matrices, grads[:, fitted._slice(layer.bias), None]], -1)
        basis = torch.kron(layer.gradient_eigenvectors, layer.activation_eigenvectors).double()
        diagonal = torch.diagonal(basis.T @ explicit_fisher(matrices) @ basis)
        assert torch.allclose(
            layer.eigenvalues.double(),
            diagonal.reshape(layer.eigenvalues.shape),
            rtol=0,
            atol=FLOAT32_RTOL * float(diagonal.max()),
        )
    expected = (grads * fitted.apply(grads)).sum(1)
    actual = fitted.training_terms[0].double()
    assert torch.allclose(actual, expected, rtol=0, atol=FLOAT32_RTOL * float(expected.max()))


@pytest.mark.parametrize("columns", [7, 64, 145])
def test_symmetric_products_are_the_full_product(columns):
    # From 64 columns the upper half of rows is formed and mirrored: the result must still be
    # uᵀu (float64: 1e-10 of the largest entry, as above), and exactly symmetric.
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(300, columns, dtype=torch.float64, generator=generator)
    products = symmetric_products(flat)
    assert close(products, torch.einsum("nk,nj->kj", flat, flat))
    assert torch.equal(products, products.T)
