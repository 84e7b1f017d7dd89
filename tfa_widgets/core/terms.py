"""The sets of weights scores are summed over, and the gradient index of each.

A score is a sum of terms: one for the model's own weights, or one per TracIn checkpoint
(``Σ_c η_c ⟨g_i^c, g_t^c⟩``). Each `WeightTerm` has its own per-example gradients and its own
index, built (or loaded from the `IndexStore`) by `TermIndexes` the first time it is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from tfa_widgets.core.errors import InputError
from tfa_widgets.core.fingerprint import combine, dataset_fingerprint
from tfa_widgets.core.gradients import GradientModel
from tfa_widgets.core.index import GradientIndex, build_index
from tfa_widgets.core.index_store import IndexStore, index_parts
from tfa_widgets.core.params import model_state
from tfa_widgets.core.settings import IndexSettings
from tfa_widgets.core.shards import ShardBuilder, ShardedIndex, ShardLayout


@dataclass
class WeightTerm:
    """One set of weights a score is summed over.

    Attributes
    ----------
    name : str
        ``"model"``, or ``"checkpoint-c"`` for TracIn checkpoint ``c``.
    gradients : GradientModel
        Per-example gradients under these weights.
    weight : float
        The term's factor in the sum (1, or the checkpoint's learning rate ``η_c``).
    index : GradientIndex or None
        The term's gradient index, once built or loaded.
    """

    name: str
    gradients: GradientModel
    weight: float
    index: GradientIndex | None = None


def weight_terms(
    model: nn.Module,
    names: list[str],
    loss: str,
    checkpoints,
    settings: IndexSettings,
    output,
) -> tuple[WeightTerm, list[WeightTerm]]:
    """Return the model's term and one term per TracIn checkpoint ``(state_dict, lr)``.

    Raises
    ------
    InputError
        When a checkpoint lacks some of the model's tensors.
    """
    own = model_state(model)

    def gradients(state: dict | None) -> GradientModel:
        if state is not None:
            missing = sorted(set(own) - set(state))
            if missing:
                raise InputError(f"a TracIn checkpoint lacks the model's tensors {missing[:5]}")
            state = {n: torch.as_tensor(state[n]).to(own[n]) for n in own}
        return GradientModel(
            model, names, loss, state, settings.batch_size, settings.strategy, output
        )

    checkpoint_terms = [
        WeightTerm(f"checkpoint-{i}", gradients(state), float(rate))
        for i, (state, rate) in enumerate(checkpoints or [])
    ]
    return WeightTerm("model", gradients(None), 1.0), checkpoint_terms


class TermIndexes:
    """Builds, or loads from the cache, the gradient index of each term, once.

    Parameters
    ----------
    store : IndexStore
        The cache on disk (or none).
    train_set : Dataset
        Fingerprinted (once, lazily) for the cache key.
    train_batches : callable
        Maps a list of batches of training indices to an iterable of their ``(images,
        encoded targets)``, in order.
    model_name, loss : str
        Parts of the cache key.
    settings : IndexSettings
        Batch size, memory budget and projection of the index.
    device : torch.device
        Where a loaded index is moved.
    progress : bool
        Show progress bars while fingerprinting and building.
    """

    def __init__(
        self,
        store: IndexStore,
        train_set: Dataset,
        train_batches: Callable[[list[list[int]]], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        model_name: str,
        loss: str,
        settings: IndexSettings,
        device: torch.device,
        progress: bool,
    ) -> None:
        self.store, self.train_set, self.train_batches = store, train_set, train_batches
        self.model_name, self.loss, self.settings = model_name, loss, settings
        self.device, self.progress = device, progress
        self.data_fingerprint: str | None = None
        self.builds = 0

    def fingerprint_parts(self, term: WeightTerm) -> dict:
        """Return the named parts the term's index depends on (see `index_parts`)."""
        if self.data_fingerprint is None:
            self.data_fingerprint = dataset_fingerprint(self.train_set, self.progress)
        return index_parts(
            term.gradients,
            model_name=self.model_name,
            data_fingerprint=self.data_fingerprint,
            loss=self.loss,
            memory_budget_mb=self.settings.memory_budget_mb,
            projection_dim=self.settings.projection_dim,
            projection_seed=self.settings.projection_seed,
            index_dtype=self.settings.index_dtype,
            projection=self.settings.projection,
        )

    def ensure(self, term: WeightTerm) -> GradientIndex | ShardedIndex:
        """Return the term's index, loading or building it the first time: a directory of
        shards when it is larger than one shard and there is a cache directory, else one
        file."""
        if term.index is not None:
            return term.index
        parts = self.fingerprint_parts(term)
        builder = self.shard_builder(term)
        layout = builder.layout(combine(**parts), parts)
        if self.store.directory is not None and layout.num_shards > 1:
            term.index, built = self.store.load_or_build_sharded(layout, builder)
        else:
            build = functools.partial(self._build, term)
            term.index, built = self.store.load_or_build(parts, build)
        self.builds += int(built)
        term.index = term.index.to(self.device)
        return term.index

    def sharded(self, term: WeightTerm) -> tuple[ShardLayout, ShardBuilder]:
        """Return the shard layout and builder of the term's index (for builds in parts).

        Raises
        ------
        InputError
            When there is no cache directory to write shards to.
        """
        if self.store.directory is None:
            raise InputError("a build in parts writes shards to disk: give the engine a cache_dir")
        parts = self.fingerprint_parts(term)
        builder = self.shard_builder(term)
        return builder.layout(combine(**parts), parts), builder

    def shard_builder(self, term: WeightTerm) -> ShardBuilder:
        """Return the builder of the term's index shards."""
        return ShardBuilder(
            term.gradients,
            self.train_batches,
            len(self.train_set),
            batch_size=self.settings.batch_size,
            memory_budget_mb=self.settings.memory_budget_mb,
            projection_dim=self.settings.projection_dim,
            projection_seed=self.settings.projection_seed,
            shard_mb=self.settings.shard_mb,
            dtype=self.settings.index_dtype,
            progress=self.progress,
            projection=self.settings.projection,
        )

    def _build(self, term: WeightTerm, fingerprint: str, parts: dict) -> GradientIndex:
        return build_index(
            term.gradients,
            self.train_batches,
            len(self.train_set),
            fingerprint=fingerprint,
            batch_size=self.settings.batch_size,
            memory_budget_mb=self.settings.memory_budget_mb,
            projection_dim=self.settings.projection_dim,
            projection_seed=self.settings.projection_seed,
            projection=self.settings.projection,
            parts=parts,
            progress=self.progress,
        )
