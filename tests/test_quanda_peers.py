"""quanda's wrappers of the peers as `bench_peers.py --quanda` builds them (quanda_peers.py).

The loss contracts are checked everywhere against closed forms; the wrappers themselves only
where quanda is installed (`make bench-peers` builds .venv-peers with it), skipped elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from core_models import small_cnn, small_dataset
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quanda_peers  # noqa: E402


@pytest.fixture(scope="module")
def example():
    model = small_cnn()
    image, label = small_dataset(1)[0]
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(image[None])[0]
    log_p = logits[label] - torch.logsumexp(logits, 0)  # log-softmax of the label, by hand
    return model, params, (image, label), log_p


def test_losses_give_the_cross_entropy_probability_and_margin_of_the_label(example):
    model, params, data, log_p = example
    p = log_p.exp()
    loss = quanda_peers._per_sample_loss(model)(params, data)
    assert float(loss) == pytest.approx(float(-log_p), rel=1e-12)
    probability = quanda_peers._correct_probability(model)(params, data)
    assert float(probability) == pytest.approx(float(p), rel=1e-12)
    margin = quanda_peers._margin(model)(params, data)
    assert float(margin) == pytest.approx(float(log_p - torch.log(1 - p)), rel=1e-10)
    images, labels = small_dataset(4)[:]
    batch = quanda_peers._batch_loss(model)(params, (images, labels))
    singles = [
        quanda_peers._per_sample_loss(model)(params, (x, y))
        for x, y in zip(images, labels, strict=True)
    ]
    assert float(batch) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-12)


def test_every_builder_names_a_wrapper_quanda_has():
    wrappers = pytest.importorskip(
        "quanda.explainers.wrappers", reason="quanda lives in .venv-peers (`make bench-peers`)"
    )
    assert [name for name in quanda_peers.BUILDERS if not hasattr(wrappers, name)] == []


def test_captum_tracincp_over_the_final_weights_is_the_float64_gradient_dot(tmp_path):
    pytest.importorskip("quanda", reason="quanda lives in .venv-peers (`make bench-peers`)")
    model, train = small_cnn(), small_dataset(12)
    checkpoint = str(tmp_path / "final.pt")
    torch.save(model.state_dict(), checkpoint)
    setting = quanda_peers.Setting(model, train, checkpoint, tmp_path)
    explainer = quanda_peers.BUILDERS["CaptumTracInCP"](setting)

    def gradients(pairs) -> torch.Tensor:  # one autograd call per example: independent code
        rows = []
        for image, label in pairs:
            loss = nn.functional.cross_entropy(model(image[None]), torch.as_tensor([int(label)]))
            rows.append(
                torch.cat([g.flatten() for g in torch.autograd.grad(loss, [*model.parameters()])])
            )
        return torch.stack(rows)

    tests, targets = small_dataset(3, seed=5)[:]
    dots = gradients(zip(tests, targets, strict=True)) @ gradients(train).T
    scores = explainer.explain(tests, targets).double()
    # float64 on both sides: sums of ~10^2 products round at about 1e-14 of the largest.
    assert torch.allclose(scores, dots, atol=1e-9 * float(dots.abs().max()), rtol=0)


def _wrapper(name: str, model, train, tmp_path):
    """quanda's wrapper ``name`` over ``model`` saved as its one checkpoint."""
    checkpoint = str(tmp_path / "final.pt")
    torch.save(model.state_dict(), checkpoint)
    return quanda_peers.BUILDERS[name](quanda_peers.Setting(model, train, checkpoint, tmp_path))


def test_kronfluence_explains_fewer_test_images_than_its_batch(tmp_path):
    pytest.importorskip("kronfluence", reason="kronfluence lives in .venv-peers")
    train = small_dataset(70)
    explainer = _wrapper("Kronfluence", small_cnn(), train, tmp_path)
    tests, targets = small_dataset(3, seed=5)[:]  # 3 < the batch of 64 that made it fail
    scores = explainer.explain(tests, targets)
    assert scores.shape == (3, 70)
    assert torch.isfinite(scores).all()


def test_dattri_self_influence_is_the_diagonal_of_its_scores_not_a_constant(tmp_path):
    pytest.importorskip("dattri", reason="dattri lives in .venv-peers")
    train = small_dataset(10)
    explainer = _wrapper("DattriEKFAC", small_cnn(), train, tmp_path)
    influence = quanda_peers.self_influence("DattriEKFAC", explainer)
    images, labels = train[:]
    diagonal = torch.stack(
        [explainer.explain(images[i : i + 1], labels[i : i + 1])[0, i] for i in range(10)]
    )
    # The same scores, batched differently: float32 sums in dattri, relative 1e-4 of the largest.
    assert torch.allclose(influence, diagonal, rtol=0, atol=1e-4 * float(diagonal.abs().max()))
    assert influence.std() > 1e-3 * influence.abs().max()  # dattri's own returns a constant
