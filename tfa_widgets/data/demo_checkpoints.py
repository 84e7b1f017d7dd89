"""TracIn checkpoints of the demo models: recorded along the training run, cached with the weights.

TracIn-CP (Pruthi et al., 2020) sums ``η_c ⟨g_c(test), g_c(train)⟩`` over checkpoints ``c`` of
one training run, ``η_c`` the step size between checkpoints. The demos keep
`CHECKPOINT_COUNT` of them, evenly spaced in epochs, the last one after the final epoch (the
trained model itself); each one's rate is the mean learning rate of the steps since the previous
checkpoint (the one-cycle schedule changes it every step). Recording copies the weights after an
epoch and changes nothing in the run: the final weights are those of a run that records nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from tfa_widgets.data.cache import write_atomic

CHECKPOINTS_FILE = "checkpoints.safetensors"
CHECKPOINT_COUNT = 4

Checkpoint = tuple[dict[str, torch.Tensor], float]
"""One TracIn checkpoint: ``(state_dict, learning rate)``, as `TFAEngine` takes them."""


def checkpoint_epochs(epochs: int, count: int = CHECKPOINT_COUNT) -> list[int]:
    """Return the epochs (from 1) after which a checkpoint is kept: ``count`` evenly spaced, the
    last one ``epochs`` (fewer when there are fewer epochs)."""
    count = max(1, min(count, epochs))
    return sorted({round(epochs * (j + 1) / count) for j in range(count)})


class CheckpointRecorder:
    """Keeps checkpoints during `train_classifier` (pass it as ``on_epoch``).

    After each epoch of `checkpoint_epochs` it copies the model's state_dict, with the mean
    learning rate of the epochs since the previous checkpoint; ``checkpoints`` lists them in
    training order.
    """

    def __init__(self, epochs: int, count: int = CHECKPOINT_COUNT) -> None:
        self.epochs = set(checkpoint_epochs(epochs, count))
        self.checkpoints: list[Checkpoint] = []
        self._rates: list[float] = []

    def __call__(self, epoch: int, model: nn.Module, mean_lr: float) -> None:
        self._rates.append(mean_lr)
        if epoch in self.epochs:
            state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            self.checkpoints.append((state, sum(self._rates) / len(self._rates)))
            self._rates = []


def save_checkpoints(folder: Path, checkpoints: list[Checkpoint]) -> None:
    """Write ``checkpoints`` to ``folder / CHECKPOINTS_FILE`` (tensors as ``"<c>/<name>"``, the
    rates in the file's metadata)."""
    from safetensors.torch import save_file

    tensors = {
        f"{c}/{name}": t.contiguous() for c, (state, _) in enumerate(checkpoints) for name, t in
        state.items()
    }  # fmt: skip
    metadata = {"rates": json.dumps([rate for _, rate in checkpoints])}
    write_atomic(
        folder / CHECKPOINTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
    )


def load_checkpoints(folder: Path) -> list[Checkpoint] | None:
    """Return the checkpoints saved in ``folder``, or None when there are none (a warning says
    why when the file exists but cannot be read)."""
    from safetensors import safe_open

    path = folder / CHECKPOINTS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            rates = json.loads(f.metadata()["rates"])
            states: list[dict[str, torch.Tensor]] = [{} for _ in rates]
            for key in sorted(f.keys()):
                c, name = key.split("/", 1)
                states[int(c)][name] = f.get_tensor(key)
    except Exception as err:  # any unreadable file means: train again and record them
        warnings.warn(f"demo checkpoints {path} are unreadable ({err}); retraining", stacklevel=3)
        return None
    return [(state, float(rate)) for state, rate in zip(states, rates, strict=True)]
