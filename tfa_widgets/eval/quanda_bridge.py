"""The engine as a quanda explainer, so that quanda's own metric classes score our scorers.

quanda (``pip install quanda``, in the separate environment ``make bench-peers`` builds: it pins
``captum<0.9`` beside this project's ``captum>=0.7``) is imported here only; nothing else in the
package needs it. `TFAExplainer` follows quanda's `Explainer` contract: built from a model and a
training set (plus keyword settings), ``explain(test_data, targets)`` returns ``[T, N]`` scores,
``self_influence()`` returns ``[N]``. quanda's ``ModelRandomizationMetric`` builds a second one
on its randomised model through the same constructor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from quanda.explainers import Explainer

from tfa_widgets.core.engine import TFAEngine
from tfa_widgets.core.errors import InputError
from tfa_widgets.eval.tda import self_scores


class TFAExplainer(Explainer):
    """quanda explainer whose scores are ``TFAEngine.scores`` (one scorer of the engine).

    Parameters
    ----------
    model, train_dataset : the trained model and the training set (as for `TFAEngine`).
    checkpoints : quanda checkpoint paths; the last one is loaded into ``model`` first (quanda's
        model randomisation passes its randomised weights this way).
    method : the engine's scorer: ``"grad_cos"``, ``"grad_dot"`` or ``"tracin_cp"``.
    **engine_kwargs : passed to `TFAEngine` (``params``, ``checkpoints`` for TracIn-CP as
        ``tracin_checkpoints``, ``memory_budget_mb``, ...).
    """

    accepted_tasks = ["image_classification"]

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: torch.utils.data.Dataset,
        task: str = "image_classification",
        checkpoints: str | Sequence[str] | None = None,
        checkpoints_load_func=None,
        method: str = "grad_cos",
        tracin_checkpoints: Sequence[tuple[dict, float]] | None = None,
        **engine_kwargs,
    ) -> None:
        super().__init__(model, train_dataset, task, checkpoints, checkpoints_load_func)
        if self.checkpoints:
            self.load_last_checkpoint()
        self.method = method
        engine_kwargs.setdefault("progress", False)
        self.engine = TFAEngine(
            model, train_dataset, method=method, checkpoints=tracin_checkpoints, **engine_kwargs
        )

    def explain(self, test_data: torch.Tensor, targets: Sequence[int] | torch.Tensor):
        """Return the scores of every training image for each test image, ``[T, N]``."""
        targets = torch.as_tensor(targets).reshape(-1).tolist()
        if len(targets) != len(test_data):
            raise InputError(f"{len(test_data)} test images but {len(targets)} targets")
        rows = [
            self.engine.scores(image.cpu(), target=int(target))
            for image, target in zip(test_data, targets, strict=True)
        ]
        return torch.stack(rows).to(self.device)

    def self_influence(self, batch_size: int = 32) -> torch.Tensor:
        """Return each training image's self-score from the stored norms, ``[N]``."""
        scores = self_scores(self.engine, self.method)
        if scores is None:
            raise InputError(f"the {self.method} scorer has no self-influence ranking")
        return scores.float().to(self.device)
