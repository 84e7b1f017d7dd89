"""quanda's own wrappers of the peers, built on the demo for `bench_peers.py --quanda`.

One builder per wrapper, registered in `BUILDERS` under the name the table prints; each returns
a quanda `Explainer` fitted on the given training set (fitting is whatever the wrapper does in
its constructor: Captum's Arnoldi iteration, dattri's EK-FAC and TRAK caches, kronfluence's
factors, traker's featurisation). Settings are the wrappers' defaults except where a default
does not fit the demo on one CPU core, each stated where it is set:

- batch size 64 everywhere (quanda's default 1 makes every pass 64 times as many calls);
- Captum `TracInCP` over the final weights only: one checkpoint at rate 1 is grad-dot, so its
  row should repeat ours (the four-checkpoint run is `bench_peers.py --peers captum_cp`);
- Captum Arnoldi with its defaults (rank 50 from a Krylov space of 200) fitted on a random 10%
  of the training set (``precompute_data_ratio``): its Arnoldi iteration takes one
  Hessian-vector product over the fitting data per Krylov vector;
- dattri TRAK and traker's TRAK project to 2048 dimensions (traker's default; dattri's is
  512), one model, no regularisation; dattri EK-FAC with damping 0.1 (its default 0 leaves
  the inverse undefined on the demo's near-zero eigenvalues);
- kronfluence with EK-FAC factors, its defaults otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BATCH = 64


@dataclass
class Setting:
    """What a builder gets: the model, its training set, the final checkpoint and a work folder."""

    model: nn.Module
    train: torch.utils.data.Dataset
    checkpoint: str
    folder: Path
    seed: int = 0


def _per_sample_loss(model: nn.Module) -> Callable:
    """dattri's loss contract: ``(params, (image, label))`` of one example -> its loss."""

    def loss(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    return loss


def _batch_loss(model: nn.Module) -> Callable:
    """dattri's EK-FAC contract: ``(params, (images, labels))`` of a batch -> mean loss."""

    def loss(params, data):
        images, labels = data
        logits = torch.func.functional_call(model, params, images)
        return nn.functional.cross_entropy(logits, labels)

    return loss


def _correct_probability(model: nn.Module) -> Callable:
    """dattri TRAK's ``correct_probability_func``: the softmax probability of the label."""

    def probability(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(logits, label.unsqueeze(0)))

    return probability


def _margin(model: nn.Module) -> Callable:
    """TRAK's model output: the log-odds of the label, ``log p - log(1 - p)``."""

    def margin(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, image.unsqueeze(0))
        p = torch.exp(-nn.functional.cross_entropy(logits, label.unsqueeze(0)))
        return torch.log(p) - torch.log1p(-p)

    return margin


def captum_tracincp_fast(s: Setting):
    """Return Captum's `TracInCPFast` over the last layer (grad-dot of ``fc``)."""
    from quanda.explainers.wrappers import CaptumTracInCPFast

    return CaptumTracInCPFast(
        s.model, s.model.fc, s.train, checkpoints=[s.checkpoint], batch_size=BATCH
    )


def captum_tracincp(s: Setting):
    """Return Captum's `TracInCP` over every parameter, final weights at rate 1 (grad-dot)."""
    from quanda.explainers.wrappers import CaptumTracInCP

    return CaptumTracInCP(s.model, s.train, checkpoints=[s.checkpoint], batch_size=BATCH)


def captum_arnoldi(s: Setting):
    """Return Captum's Arnoldi influence function (rank 50 of a Krylov space of 200)."""
    from quanda.explainers.wrappers import CaptumArnoldi

    return CaptumArnoldi(
        s.model, s.train, checkpoints=[s.checkpoint], batch_size=BATCH,
        precompute_data_ratio=0.1, seed=s.seed,
    )  # fmt: skip


def dattri_ekfac(s: Setting):
    """Return dattri's EK-FAC influence function (its default: the ``nn.Linear`` modules)."""
    from quanda.explainers.wrappers import DattriEKFAC

    return DattriEKFAC(
        s.model, s.train, loss_func=_batch_loss, checkpoints=[s.checkpoint],
        batch_size=BATCH, damping=0.1, device="cpu",
    )  # fmt: skip


def dattri_trak(s: Setting):
    """Return dattri's TRAK, one model, 2048 dimensions."""
    from quanda.explainers.wrappers import DattriTRAK

    projector = {"proj_dim": 2048, "proj_seed": s.seed, "proj_max_batch_size": 32}
    return DattriTRAK(
        s.model, s.train, loss_func=_margin, correct_probability_func=_correct_probability,
        checkpoints=[s.checkpoint], batch_size=BATCH, projector_kwargs=projector, device="cpu",
    )  # fmt: skip


def kronfluence(s: Setting):
    """Return kronfluence's EK-FAC influence (quanda's image-classification task)."""
    from kronfluence.arguments import FactorArguments
    from quanda.explainers.wrappers import Kronfluence
    from quanda.explainers.wrappers.kronfluence_tasks import ImageClassificationTask

    class QueryBatched(Kronfluence):
        """quanda asks kronfluence for query batches of its batch size and no training batch
        size; kronfluence's search for one then reads a full query batch from the test images,
        past their end when there are fewer (IndexError): a query batch of at most them."""

        def explain(self, test_data, targets, **kwargs):
            self.batch_size = min(BATCH, len(test_data))
            try:
                return super().explain(test_data, targets, **kwargs)
            finally:
                self.batch_size = BATCH

    return QueryBatched(
        s.model, ImageClassificationTask(), s.train, batch_size=BATCH, device="cpu",
        factor_args=FactorArguments(strategy="ekfac"), cache_dir=str(s.folder / "kronfluence"),
        load_from_disk=False,
    )  # fmt: skip


def traker(s: Setting):
    """Return traker's TRAK (its basic CPU projector), one model, 2048 dimensions."""
    from quanda.explainers.wrappers import TRAK

    return TRAK(
        s.model, s.train, model_id="demo", cache_dir=str(s.folder / "trak"),
        projector="basic", proj_dim=2048, seed=s.seed, batch_size=BATCH, load_from_disk=False,
    )  # fmt: skip


def self_influence(name: str, explainer) -> torch.Tensor:
    """Return the wrapper's self-influence ``[N]``: its own, except where it fails here.

    dattri 0.3's ``self_attribute`` fails behind both dattri wrappers: for EK-FAC (its base
    class) it adds each batch's values to every entry (a constant vector at batch size 1, a
    shape error otherwise); for TRAK, quanda calls it without a loader once the training set is
    cached and dattri reads ``None.sampler``. For these two, quanda's generic
    ``Explainer.self_influence``: the diagonal of ``explain`` over batches of training images.
    """
    from quanda.explainers import Explainer

    if name in ("DattriEKFAC", "DattriTRAK"):
        return Explainer.self_influence(explainer, batch_size=BATCH)
    return explainer.self_influence(batch_size=BATCH)


BUILDERS: dict[str, Callable[[Setting], object]] = {
    "CaptumTracInCPFast": captum_tracincp_fast,
    "CaptumTracInCP": captum_tracincp,
    "CaptumArnoldi": captum_arnoldi,
    "DattriEKFAC": dattri_ekfac,
    "DattriTRAK": dattri_trak,
    "Kronfluence": kronfluence,
    "TRAK": traker,
}
