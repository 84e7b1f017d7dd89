"""The TFA engine: a thin facade over the core's parts.

It resolves each test and target once (`Query`) and delegates: training data
(`data_access`), per-weights gradients and their indexes (`terms`), test gradients
(`test_gradients`), scores and top-k (`score_service`), TFA maps (`map_service`) and reference
maps such as Grad-CAM (`reference_maps`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.data_access import TrainingData, check_dataset
from tfa_widgets.core.errors import InputError
from tfa_widgets.core.explanation import Explanation
from tfa_widgets.core.index import GradientIndex
from tfa_widgets.core.index_store import DEFAULT_BUDGET_MB, IndexStore
from tfa_widgets.core.losses import check_loss
from tfa_widgets.core.map_service import MapService
from tfa_widgets.core.outputs import OutputFn
from tfa_widgets.core.params import ParamSpec, ensure_eval, model_state, select_parameter_names
from tfa_widgets.core.preconditioned import PRECONDITIONED, PreconditionedScorers, ScoringTerm
from tfa_widgets.core.prediction import Predictor
from tfa_widgets.core.queries import Target, TestInput
from tfa_widgets.core.query import Query, QueryResolver, image_key
from tfa_widgets.core.reference_maps import REFERENCE_MAPS
from tfa_widgets.core.reference_service import ReferenceMapService
from tfa_widgets.core.score_service import ScoreService
from tfa_widgets.core.scoring import SCORERS, IndexScorer, available_scorers, make_scorer
from tfa_widgets.core.search import IndexSearch, SearchSettings, search_settings
from tfa_widgets.core.settings import IndexSettings, SmoothGrad
from tfa_widgets.core.shards import ShardedIndex
from tfa_widgets.core.terms import TermIndexes, WeightTerm, weight_terms
from tfa_widgets.core.test_gradients import TestGradients
from tfa_widgets.core.validation import (
    as_integer,
    check_image,
    check_indices,
    check_k,
)

SingleTest = int | torch.Tensor | Query


class TFAEngine:
    """Training feature attribution for one model and one training set.

    Parameters
    ----------
    model : nn.Module
        The classifier; switched to eval mode (with a warning) if it is training.
    train_set, test_set : Dataset
        Map-style datasets yielding ``(image [C, H, W], label)``. A training set with a
        ``fingerprint`` string attribute is trusted to describe its content: the index cache is
        keyed by it, so it must change whenever the content does.
    loss : {"cross_entropy", "bce"}
        Single-label cross-entropy, or multi-label BCE with logits (multi-hot labels).
    params : names, modules or parameters, optional
        Parameters gradients are taken over; all trainable ones by default.
    method : {"grad_cos", "grad_dot", "tracin_cp", "influence", "relatif", "trak"}
        Default scorer; each query may override it. Influence and RelatIF (EK-FAC) and TRAK
        (cross-entropy only) are fitted on first use and cached beside the indexes (see
        `tfa_widgets.core.preconditioned`).
    device : str or torch.device, optional
        Where to compute; the model's device by default.
    cache_dir : path, optional
        Where gradient indexes are kept, one file per fingerprint of weights, data and
        settings (switching checkpoints reuses each one's index); no disk cache when ``None``.
    display : callable, optional
        Maps a model-space image ``[C, H, W]`` to RGB ``[H, W, 3]`` in [0, 1].
    checkpoints : list of (state_dict, learning_rate), optional
        TracIn-CP checkpoints.
    search : {"exact", "faiss", "ivf"} or SearchSettings
        How ``top_k`` finds its candidates in the index: every row scored a chunk at a time
        (``"exact"``), or a FAISS structure built once and cached beside the index (``"faiss"``:
        flat; ``"ivf"``: inverted lists, approximate, for millions of rows). See
        `SearchSettings`.
    scorer_settings : dict, optional
        Keyword arguments of the preconditioned scorers' classes, by name, e.g.
        ``{"influence": {"settings": KFACSettings(damping=0.01)}, "trak": {"dim": 1024}}``
        (`tfa_widgets.core.scoring`). Their fits are cached in ``cache_dir`` beside the
        indexes, within ``cache_budget_mb``, keyed by weights, data and these settings.
    settings : IndexSettings, optional
        ``batch_size``, ``memory_budget_mb``, ``projection_dim``, ``projection_seed``,
        ``projection``, ``rescore``, ``strategy``, ``cache_budget_mb``,
        ``test_gradient_cache_mb``, ``shard_mb``, ``index_dtype`` and ``num_workers`` as one
        value (`tfa_widgets.core.settings.IndexSettings`), instead of the keywords below.
    batch_size : int
        Images per batch when computing gradients, scores and maps.
    memory_budget_mb : float
        Exact gradients are stored while ``N × P × 4`` bytes fit; otherwise projections
        (``0``: always project).
    projection_dim : int
        Dimension of projected gradients.
    projection_seed : int
        Seed of the random projection.
    projection : {"countsketch", "logra"}
        How gradients are projected: a CountSketch of the full per-sample gradients (the
        default: at the same ``projection_dim`` it found 0.90 of a ResNet-18's exact top-10
        before re-scoring, the factorised one 0.60, which builds about 3x faster there;
        ``benchmarks/scale_build.py``), or factorised per Linear/Conv2d layer (LoGra, see
        `tfa_widgets.core.logra`; models whose layers are not factored fall back to the
        CountSketch). A sharded index is always a CountSketch.
    rescore : int
        With a projected index, ``max(rescore, 2k)`` candidates are re-scored exactly by
        ``top_k``.
    strategy : {"auto", "factored", "vmap"}
        How per-example gradients are batched (see `GradientModel`).
    progress : bool
        Show progress bars for the slow steps (fingerprinting the data, building the index,
        exact scores).
    output : callable, optional
        Maps the model's output to its logits ``[B, num_classes]``, for models that return
        something else: ``lambda out: out[0]`` for a tuple, ``lambda out: out[:, None]`` (with
        ``loss="bce"``) for one logit per image. A mapping with a ``"logits"`` tensor (Hugging
        Face outputs) is read without it. Applied wherever the model is called.
    cache_budget_mb : float
        Size of all index files in ``cache_dir`` together; least recently used ones are
        removed first (see `IndexStore`).
    test_gradient_cache_mb : float
        Memory for the test-image gradients kept for the next query (a ResNet-18 gradient is
        about 45 MB); least recently used ones are dropped first, the latest is always kept.
    shard_mb : float
        With a ``cache_dir``, an index larger than this is built as a directory of shards of
        this size, each written as soon as it is computed (memory bounded by one shard,
        resumable after an interruption, mapped instead of read when loaded; see
        `tfa_widgets.core.shards`); a smaller one stays one file.
    index_dtype : {"float32", "float16"}
        How a sharded index stores its features: float16 halves the disk and the scan, and
        moves a grad-cos score by at most about ``5e-4`` before exact re-scoring.
    num_workers : int
        ``torch.utils.data.DataLoader`` workers reading training images for the index build
        and for exact scores over the training set (``0``: read in this process). The order is
        fixed, so the index does not depend on it.

    Raises
    ------
    InputError
        When the model is not an ``nn.Module``, ``output`` is not callable, a size or budget
        is not a valid number, ``settings`` comes with keywords that differ from their
        defaults, a setting is unknown, ``params`` selects nothing, a checkpoint lacks some of
        the model's tensors, ``method="tracin_cp"`` has no checkpoints,
        ``scorer_settings`` names an unknown scorer or setting, or a FAISS ``search`` is asked
        for without FAISS installed.
    DatasetError
        When a dataset is not a non-empty map-style dataset of ``(image [C, H, W], label)``.

    Notes
    -----
    On the CPU the engine lets malloc keep freed memory for reuse (`keep_freed_memory`,
    process-wide, at most 256 MB kept): otherwise the kernel zero-fills the same pages again for
    every batch of an index build.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        test_set: Dataset | None = None,
        *,
        loss: str = "cross_entropy",
        params: ParamSpec = None,
        method: str = "grad_cos",
        device: str | torch.device | None = None,
        cache_dir: str | Path | None = None,
        display: Callable[[torch.Tensor], torch.Tensor] | None = None,
        checkpoints: Sequence[tuple[dict, float]] | None = None,
        batch_size: int = 64,
        memory_budget_mb: float = 1024,
        projection_dim: int = 4096,
        projection_seed: int = 0,
        projection: str = "countsketch",
        rescore: int = 16,
        strategy: str = "auto",
        progress: bool = True,
        output: OutputFn | None = None,
        cache_budget_mb: float = DEFAULT_BUDGET_MB,
        test_gradient_cache_mb: float = 512,
        shard_mb: float = 64,
        index_dtype: str = "float32",
        num_workers: int = 0,
        search: str | SearchSettings = "exact",
        settings: IndexSettings | None = None,
        scorer_settings: dict[str, dict] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output is not None and not callable(output):
            raise InputError(f"output must map the model's output to logits, got {output!r}")
        self.settings = IndexSettings.merged(
            settings,
            batch_size=batch_size,
            memory_budget_mb=memory_budget_mb,
            projection_dim=projection_dim,
            projection_seed=projection_seed,
            projection=projection,
            rescore=rescore,
            strategy=strategy,
            cache_budget_mb=cache_budget_mb,
            test_gradient_cache_mb=test_gradient_cache_mb,
            shard_mb=shard_mb,
            index_dtype=index_dtype,
            num_workers=num_workers,
        )
        check_dataset(train_set, "training set")
        if test_set is not None:
            check_dataset(test_set, "test set")
        self.loss = check_loss(loss)
        self.method = _check_method(method)
        first = next(model.parameters(), None)
        self.device = (
            torch.device(device)
            if device
            else (first.device if first is not None else torch.device("cpu"))
        )
        self.model = ensure_eval(model).to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.train_set, self.test_set = train_set, test_set
        self.output, self.display, self.progress = output, display, progress
        self.index_store = IndexStore(cache_dir, self.settings.cache_budget_mb)
        self.cache_dir = self.index_store.directory
        self.param_names = select_parameter_names(self.model, params)
        self.dtype = next(iter(model_state(self.model).values())).dtype
        self._predictor = Predictor(self.model, output, self.loss)
        self.train_data = TrainingData(
            train_set, self.device, self.dtype, self._predictor, self.settings.num_workers
        )
        self.image_shape = self.train_data.image_shape
        self.num_classes = self.train_data.num_classes
        self.class_names = self.train_data.class_names
        self._model_term, self._checkpoint_terms = weight_terms(
            self.model, self.param_names, self.loss, checkpoints, self.settings, output
        )
        if _needs_checkpoints(self.method) and not self._checkpoint_terms:
            raise InputError(
                f"method {self.method!r} needs checkpoints: a list of (state_dict, lr)"
            )
        batch = self.settings.batch_size
        self._indexes = TermIndexes(
            self.index_store,
            train_set,
            self.train_data.batches,
            type(self.model).__qualname__,
            self.loss,
            self.settings,
            self.device,
            progress,
        )
        self._preconditioned = PreconditionedScorers(  # fits cached beside the indexes
            self._scoring_term(self._model_term),
            [self._scoring_term(term) for term in self._checkpoint_terms],
            self.train_data.batch,
            self.num_train,
            batch,
            progress,
            store=self.index_store,
            data_fingerprint=lambda: self._indexes.fingerprint_parts(self._model_term)["data"],
            settings=scorer_settings,
        )
        self._test_gradients = TestGradients(
            self._predictor, self.num_classes, self.settings.test_gradient_cache_mb
        )
        self._queries = QueryResolver(
            test_set,
            self.image_shape,
            self.device,
            self.dtype,
            self.num_classes,
            self._predictor,
            functools.partial(self._test_gradients.predicted_class, self._model_term),
        )
        self._search = IndexSearch(search_settings(search), self.index_store, self.device, progress)
        self._scores = ScoreService(
            self.train_data,
            self._terms,
            self._indexes,
            self._test_gradients,
            self._preconditioned,
            self._search,
            batch,
            self.settings.rescore,
            progress,
        )
        self._maps = MapService(
            self._terms, self._test_gradients, self._preconditioned, self._predictor, batch
        )
        self._reference = ReferenceMapService(
            self.model, output, self.image_shape, self.num_classes, self.device, self.dtype
        )

    # ----------------------------------------------------------------- what it can do
    def _scoring_term(self, term: WeightTerm) -> ScoringTerm:
        return ScoringTerm(term.gradients, functools.partial(self._indexes.ensure, term))

    def _terms(self, method: str) -> list[WeightTerm]:
        if _needs_checkpoints(method):
            if not self._checkpoint_terms:
                raise InputError(f"method {method!r} needs checkpoints given to the engine")
            return self._checkpoint_terms
        if method in PRECONDITIONED and self._preconditioned.over_checkpoints(method):
            return self._checkpoint_terms  # TRAK's ensemble over the checkpoints
        return [self._model_term]

    @property
    def methods(self) -> list[str]:
        """The scorers this engine can use, in the registry's order
        (`tfa_widgets.core.scoring.SCORERS`): TracIn-CP only when given checkpoints, the
        preconditioned ones as `PreconditionedScorers` serves them (TRAK only with the
        cross-entropy loss)."""
        has = {"factors", "projection"} | ({"checkpoints"} if self._checkpoint_terms else set())
        served = self._preconditioned.methods(self.loss)
        return [
            name
            for name in available_scorers(has)
            if isinstance(make_scorer(name), IndexScorer) or name in served
        ]

    @property
    def method_labels(self) -> dict[str, str]:
        """Each scorer of `methods` with its name for people, e.g. ``"Grad-Cos"``."""
        return {name: SCORERS[name].label for name in self.methods}

    @property
    def reference_kinds(self) -> list[str]:
        """The reference maps `reference_maps` computes (see `tfa_widgets.core.reference_maps`):
        Grad-CAM, saliency and Integrated Gradients."""
        return list(REFERENCE_MAPS)

    def _check_method(self, method: str) -> str:
        """Return ``method`` after checking this engine can score with it."""
        _check_method(method)
        self._terms(method)  # says which checkpoints are missing
        if method not in self.methods:  # then only the loss rules it out (TRAK)
            raise InputError(
                f"method {method!r} needs the cross-entropy loss, not {self.loss!r}; this "
                f"engine offers {self.methods}"
            )
        return method

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_set)

    @property
    def index_builds(self) -> int:
        """How many gradient indexes this engine built (not loaded from the cache)."""
        return self._indexes.builds

    # ----------------------------------------------------------------- queries
    def query(self, test: SingleTest, target: Target = None) -> Query:
        """Return the `Query` of one test image and target, resolved once.

        Pass it to `explain`, `scores`, `top_k` or `tfa_maps` instead of ``test`` (with no
        ``target``): the image is not read and the target not resolved again, and its ``key``
        and ``target`` identify the question (the explorer's caches are keyed by them).

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` (returned as it is).
        target : None, "predicted", "true" or int
            The class explained: by default (``None`` or ``"predicted"``) the class the model
            predicts, the test label with ``"true"``, or a class index.

        Returns
        -------
        Query
            The test image on the engine's device, its key, label and the class explained.
        """
        return self._queries.resolve(test, target)

    def build_index(self, method: str | None = None) -> GradientIndex | list[GradientIndex]:
        """Build (or load from the cache) the gradient index the scorer needs.

        A cached index that is truncated or corrupt is reported and rebuilt.

        Parameters
        ----------
        method : str, optional
            The scorer whose index is built (the engine's default when ``None``); TracIn-CP
            builds one index per checkpoint.

        Returns
        -------
        GradientIndex or list of GradientIndex
            The index, or one index per checkpoint for TracIn-CP.

        Raises
        ------
        IndexCacheError
            Before any work, when a built index could not be saved in ``cache_dir``.
        InputError
            When ``method`` is unknown, or is ``"tracin_cp"`` without checkpoints.
        """
        method = self._check_method(method or self.method)
        indexes = [self._indexes.ensure(term) for term in self._terms(method)]
        return indexes if _needs_checkpoints(method) else indexes[0]

    def build_index_part(self, part: int, parts: int) -> Path:
        """Compute one part of the sharded index: the shards ``s`` with ``s % parts == part``.

        For a build split across processes (``torchrun``) or cluster jobs (see
        `tfa_widgets.index`); once every part is done, `gather_index` checks the shards, writes
        the manifest and loads the index. Parts may run at the same time or one after another,
        and a part that is run again computes only its shards that are missing or corrupt.

        Parameters
        ----------
        part : int
            This part, ``0 <= part < parts``.
        parts : int
            How many parts the build is split into.

        Returns
        -------
        Path
            The index directory the shards were written to.

        Raises
        ------
        InputError
            When ``part`` is not in ``[0, parts)`` or the engine has no ``cache_dir``.
        IndexCacheError
            When the index cannot be written in ``cache_dir``.
        """
        parts = as_integer(parts, "parts")
        part = as_integer(part, "part")
        if parts < 1 or not 0 <= part < parts:
            raise InputError(f"part must be an integer in [0, {parts}), got {part!r}")
        layout, builder = self._indexes.sharded(self._model_term)
        self.index_store.load_or_build_sharded(layout, builder, (part, parts))
        return self.index_store.shard_directory(layout.fingerprint)

    def gather_index(self) -> ShardedIndex:
        """Return the sharded index whose parts `build_index_part` computed, after checking
        every shard and writing the manifest (the gather step; nothing is computed).

        Returns
        -------
        ShardedIndex
            The index, also used by this engine's queries from now on.

        Raises
        ------
        InputError
            When the engine has no ``cache_dir``.
        IndexCacheError
            When shards are missing or corrupt (the message names them and their parts).
        """
        layout, _ = self._indexes.sharded(self._model_term)
        index, _ = self.index_store.load_or_build_sharded(layout, None)
        self._model_term.index = index.to(self.device)
        return self._model_term.index

    def predict(self, test: SingleTest) -> torch.Tensor:
        """Return the class probabilities of a test image, ``[num_classes]``.

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query` (then with ``target=None``).

        Returns
        -------
        torch.Tensor
            Softmax probabilities (sigmoids for multi-label ``"bce"``), on the CPU.

        Raises
        ------
        InputError
            When ``test`` is not a valid index or image (or is an index without a test set).
        NonFiniteError
            When the model's outputs are NaN or infinite.
        """
        _, image, _ = self._queries.test_input(test)
        return self._predictor.probabilities_of(image).float().cpu()

    def predict_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Return class probabilities ``[B, num_classes]`` of images ``[B, C, H, W]``.

        Parameters
        ----------
        images : torch.Tensor
            A batch in model space, each image of the training images' shape.

        Returns
        -------
        torch.Tensor
            Softmax probabilities (sigmoids for multi-label ``"bce"``), on the CPU.

        Raises
        ------
        InputError
            When ``images`` is not a 4-D tensor of images of the right shape.
        NonFiniteError
            When the model's outputs are NaN or infinite.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InputError(
                f"predict_batch needs images [B, C, H, W], got {getattr(images, 'shape', images)!r}"
            )
        for i, image in enumerate(images):
            check_image(image, self.image_shape, f"image {i} of the batch")
        return self._predictor.probabilities(images.to(self.device, self.dtype)).float().cpu()

    def scores(
        self,
        test: TestInput,
        target: Target | Sequence = None,
        method: str | None = None,
        exact: bool = False,
    ) -> torch.Tensor:
        """Return the score of every training image for the test image(s) and target.

        ``[N]`` for one test (an index or an image ``[C, H, W]``), ``[B, N]`` for many (a
        sequence of indices or a batch ``[B, C, H, W]``: one matrix product against the index).
        Exact when the index holds exact gradients. From projected gradients otherwise
        (``top_k`` re-scores its candidates exactly), unless ``exact``: then every training
        image is re-scored exactly, by one forward-mode pass over the training set.

        Parameters
        ----------
        test : int, torch.Tensor, Query or sequence of int
            One test (an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query`) or many (a sequence of indices, or a batch ``[B, C, H, W]``).
        target : None, "predicted", "true", int, or a sequence of them
            The class each test image is explained for: by default (``None`` or ``"predicted"``)
            the class the model predicts, the test label with ``"true"``, or a class index. A
            sequence gives one target per test. Captum's ``TracInCP`` and dattri take the label
            instead: on a misclassified test image the results differ unless ``target="true"`` is
            passed.
        method : str, optional
            The scorer (the engine's default when ``None``).
        exact : bool
            Re-score every training image exactly when the index is projected (no effect on an
            exact index).

        Returns
        -------
        torch.Tensor
            One score per training image on the CPU: ``[N]`` for one test, ``[B, N]`` for many.

        Raises
        ------
        InputError
            When a test, a target or ``method`` is invalid, or the number of targets does not
            match the number of tests.
        SaturatedPredictionError
            When the model is so certain of a target class that the test gradient vanishes (every
            score would be 0); explain another class instead.
        """
        method = self._check_method(method or self.method)
        queries, batched = self._queries.resolve_many(test, target)
        rows = self._scores.scores(queries, method, exact)
        return rows if batched else rows[0]

    def self_scores(self, method: str | None = None) -> torch.Tensor:
        """Return each training image's score against itself, ``[N]``, from the index's norms.

        Grad-Dot: ``‖g_i‖²``; TracIn-CP: ``Σ_c η_c ‖g_i^c‖²``. High self-influence marks
        examples the model fits with difficulty, mislabelled ones first (Captum's
        ``self_influence``, dattri's ``self_attribute``).

        Parameters
        ----------
        method : {"grad_dot", "tracin_cp"}, optional
            The scorer (the engine's default when ``None``).

        Returns
        -------
        torch.Tensor
            One self-score per training image, ``[N]``, in float32 on the CPU.

        Raises
        ------
        InputError
            For Grad-Cos, whose self-score is 1 for every image by definition.
        """
        return self._scores.self_scores(self._check_method(method or self.method))

    def top_k(
        self,
        test: TestInput,
        k: int,
        target: Target | Sequence = None,
        opponents: bool = False,
        method: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return indices and scores of the ``k`` highest (or lowest) scoring training images.

        ``[k]`` each for one test, ``[B, k]`` for many (``test`` and ``target`` as in
        `scores`: the predicted class by default). With a projected index the
        ``max(rescore, 2k)`` best candidates of each test are re-scored exactly and ranked by
        their exact scores.

        Parameters
        ----------
        test : int, torch.Tensor, Query or sequence of int
            One test (an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query`) or many (a sequence of indices, or a batch ``[B, C, H, W]``).
        k : int
            How many training images, ``1 <= k <= N``.
        target : None, "predicted", "true", int, or a sequence of them
            The class each test image is explained for: by default (``None`` or ``"predicted"``)
            the class the model predicts, the test label with ``"true"``, or a class index. A
            sequence gives one target per test. Captum's ``TracInCP`` and dattri take the label
            instead: on a misclassified test image the results differ unless ``target="true"`` is
            passed.
        opponents : bool
            The lowest scores (working against the prediction) instead of the highest.
        method : str, optional
            The scorer (the engine's default when ``None``).

        Returns
        -------
        indices : torch.Tensor
            Training indices, best first: ``[k]`` for one test, ``[B, k]`` for many.
        scores : torch.Tensor
            Their scores, ``[k]`` or ``[B, k]``, on the CPU.

        Raises
        ------
        InputError
            When ``k``, a test, a target or ``method`` is invalid.
        SaturatedPredictionError
            When the model is so certain of a target class that the test gradient vanishes.
        """
        method = self._check_method(method or self.method)
        k = check_k(k, self.num_train)
        queries, batched = self._queries.resolve_many(test, target)
        indices, values = self._scores.top_k(queries, k, opponents, method)
        return (indices, values) if batched else (indices[0], values[0])

    def tfa_maps(
        self,
        test: SingleTest,
        train_indices: Sequence[int] | torch.Tensor,
        target: Target = None,
        smooth: SmoothGrad | None = None,
        method: str | None = None,
    ) -> torch.Tensor:
        """Return ``∇_{x_i} S(z_i, z_t)`` for each training image, ``[k, C, H, W]``.

        With ``smooth``, the average over noisy copies of each training image (SmoothGrad).

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query` (then with ``target=None``).
        train_indices : sequence of int or torch.Tensor
            The training images to map (e.g. from `top_k`).
        target : None, "predicted", "true" or int
            The class explained: by default (``None`` or ``"predicted"``) the class the model
            predicts, the test label with ``"true"``, or a class index. Captum's ``TracInCP`` and
            dattri take the label instead: on a misclassified test image the results differ unless
            ``target="true"`` is passed.
        smooth : SmoothGrad, optional
            SmoothGrad settings; plain maps when ``None``.
        method : str, optional
            The scorer (the engine's default when ``None``).

        Returns
        -------
        torch.Tensor
            Per-channel maps ``[k, C, H, W]`` on the CPU (reduce them with
            ``tfa_widgets.core.maps.reduce_maps``).

        Raises
        ------
        InputError
            When the test, the indices, the target, ``smooth`` or ``method`` is invalid.
        NonFiniteError
            When the maps are NaN or infinite.
        SaturatedPredictionError
            When the model is so certain of the target class that the test gradient vanishes.
        """
        method = self._check_method(method or self.method)
        indices = check_indices(train_indices, self.num_train)
        query = self._queries.resolve(test, target)
        return self._maps.maps(query, self.train_data.load(indices.tolist()), smooth, method)

    def gradcam(
        self,
        image: torch.Tensor,
        target: int | Sequence[int],
        layer: str | nn.Module | None = None,
    ) -> torch.Tensor:
        """Return Grad-CAM in [0, 1]: ``[H, W]`` for an image, ``[B, H, W]`` for a batch.

        Parameters
        ----------
        image : torch.Tensor
            An image ``[C, H, W]`` or a batch ``[B, C, H, W]`` in model space.
        target : int or sequence of int
            The class explained, one for all images or one per image.
        layer : str or nn.Module, optional
            The layer whose activations are weighted; by default the last convolution whose
            output is at least 4×4.

        Returns
        -------
        torch.Tensor
            ReLU-ed maps, min-max scaled per image and resized to the input, on the CPU.

        Raises
        ------
        InputError
            When the image is not ``[C, H, W]`` or ``[B, C, H, W]`` of the training images' shape,
            a target is out of range, or the layer is unknown.
        NonFiniteError
            When the maps are NaN or infinite (activations or gradients that are not finite).
        """
        return self.reference_maps(image, target, "gradcam", layer)

    def reference_maps(
        self,
        image: torch.Tensor,
        target: int | Sequence[int],
        kind: str = "gradcam",
        layer: str | nn.Module | None = None,
    ) -> torch.Tensor:
        """Return a reference map of an image or a batch, one of `reference_kinds`.

        Parameters
        ----------
        image : torch.Tensor
            An image ``[C, H, W]`` or a batch ``[B, C, H, W]`` in model space.
        target : int or sequence of int
            The class explained, one for all images or one per image.
        kind : str
            ``"gradcam"``, ``"saliency"`` or ``"integrated_gradients"``.
        layer : str or nn.Module, optional
            The layer of Grad-CAM; by default the last convolution whose output is at least
            4×4.

        Returns
        -------
        torch.Tensor
            On the CPU: Grad-CAM ``[H, W]`` (or ``[B, H, W]``) in [0, 1]; saliency and
            Integrated Gradients shaped like the image (or the batch).

        Raises
        ------
        InputError
            When the image is not ``[C, H, W]`` or ``[B, C, H, W]`` of the training images' shape,
            a target is out of range, or the kind or the layer is unknown.
        NonFiniteError
            When the maps are NaN or infinite (activations or gradients that are not finite).
        """
        return self._reference.maps(image, target, kind, layer)

    def gradcam_layer_name(self, layer: str | nn.Module | None = None) -> str:
        """Return the name of the module Grad-CAM is computed at for ``layer``.

        Parameters
        ----------
        layer : str or nn.Module, optional
            A layer name or module; by default the last convolution whose output is at least
            4×4.

        Returns
        -------
        str
            Its name in ``model.named_modules()``.

        Raises
        ------
        InputError
            When the layer is unknown or has no spatial output.
        """
        return self._reference.layer_name(layer)

    def saliency(self, image: torch.Tensor, target: int) -> torch.Tensor:
        """Return the plain input gradient of the target logit, ``[C, H, W]``.

        Parameters
        ----------
        image : torch.Tensor
            An image ``[C, H, W]`` in model space.
        target : int
            The class whose logit is differentiated.

        Returns
        -------
        torch.Tensor
            The gradient, on the CPU.

        Raises
        ------
        InputError
            When the image has the wrong shape or the target is out of range.
        """
        return self.reference_maps(check_image(image, self.image_shape), target, "saliency")

    def to_display(self, image: torch.Tensor) -> torch.Tensor:
        """Return an RGB picture ``[H, W, 3]`` in [0, 1] of a model-space image ``[C, H, W]``.

        Uses the engine's ``display`` transform, else min-max scaling.

        Parameters
        ----------
        image : torch.Tensor
            An image ``[C, H, W]`` in model space.

        Returns
        -------
        torch.Tensor
            The picture, on the CPU, clamped to [0, 1] (a single channel is repeated three times).

        Raises
        ------
        InputError
            When ``display`` does not return an ``[H, W, 3]`` (or ``[H, W, 1]``) image.
        """
        image = image.detach().float().cpu()
        if self.display is not None:
            rgb = torch.as_tensor(self.display(image)).float()
        else:
            low, high = image.min(), image.max()
            rgb = ((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0)
        if rgb.dim() == 3 and rgb.shape[-1] == 1:
            rgb = rgb.expand(-1, -1, 3)
        if rgb.dim() != 3 or rgb.shape[-1] != 3:
            raise InputError(
                f"display must return an [H, W, 3] image, got shape {tuple(rgb.shape)}"
            )
        return rgb.clamp(0, 1)

    def resolve_target(self, test: TestInput, target: Target = None) -> int:
        """Return the class explained for ``test``: ``target`` resolved as every query does.

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query` (then with ``target=None``).
        target : None, "predicted", "true" or int
            The class explained: by default (``None`` or ``"predicted"``) the class the model
            predicts, the test label with ``"true"``, or a class index. Captum's ``TracInCP`` and
            dattri take the label instead: on a misclassified test image the results differ unless
            ``target="true"`` is passed.

        Returns
        -------
        int
            The class index (for ``"true"`` with multi-label ``"bce"``, the most probable
            positive class of the label).

        Raises
        ------
        InputError
            When the test or the target is invalid, or ``"true"`` is asked of a bare image.
        """
        return self._queries.resolve(test, target).target

    def test_key(self, test: TestInput) -> tuple:
        """Return a hashable key identifying ``test`` (its index, or a hash of the image).

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query` (then with ``target=None``).

        Returns
        -------
        tuple
            ``("index", i)`` for a test-set index, ``("image", sha1)`` for an image.

        Raises
        ------
        InputError
            When ``test`` is not a valid index or image.
        """
        index, image, _ = self._queries.test_input(test)
        return ("index", index) if index is not None else image_key(image)

    def own_label_class(self, label: object) -> int:
        """Return the class a training label stands for (the first positive one if multi-label).

        Parameters
        ----------
        label : int or multi-hot vector
            A label as the training set yields it.

        Returns
        -------
        int
            The class index (0 for a multi-label image without a positive class).
        """
        return self.train_data.own_class(label)

    def explain(
        self,
        test: SingleTest,
        k: int = 8,
        target: Target = None,
        smooth: SmoothGrad | None = None,
        opponents: bool = False,
        method: str | None = None,
        layer: str | nn.Module | None = None,
    ) -> Explanation:
        """Return everything the explorer shows for one test image: see `Explanation`.

        Parameters
        ----------
        test : int, torch.Tensor or Query
            One test: an index into the test set, an image ``[C, H, W]`` in model space, or a
            `Query` from `query` (then with ``target=None``).
        k : int
            How many training images, ``1 <= k <= N``.
        target : None, "predicted", "true" or int
            The class explained: by default (``None`` or ``"predicted"``) the class the model
            predicts, the test label with ``"true"``, or a class index. Captum's ``TracInCP`` and
            dattri take the label instead: on a misclassified test image the results differ unless
            ``target="true"`` is passed.
        smooth : SmoothGrad, optional
            SmoothGrad settings of the TFA maps; plain maps when ``None``.
        opponents : bool
            Explain the lowest-scoring training images instead of the highest.
        method : str, optional
            The scorer (the engine's default when ``None``).
        layer : str or nn.Module, optional
            The layer of both Grad-CAMs; by default the last convolution whose output is at
            least 4×4. Each Grad-CAM is computed once, at this layer.

        Returns
        -------
        Explanation
            The top-k training images with their scores, per-channel TFA maps (reduce them with
            `Explanation.reduced_maps`) and Grad-CAM, and the test image's prediction and
            Grad-CAM. Each training image is read from the training set once.

        Raises
        ------
        InputError
            When ``k`` is invalid (and, from the steps it runs, any input error of `top_k`,
            `tfa_maps` or `gradcam`).
        SaturatedPredictionError
            When the model is so certain of the target class that the test gradient vanishes.
        """
        method = self._check_method(method or self.method)
        k = check_k(k, self.num_train)
        query = self._queries.resolve(test, target)
        probs = self._predictor.probabilities_of(query.image)
        indices, values = self._scores.top_k([query], k, opponents, method)
        indices, values = indices[0], values[0]
        batch = self.train_data.load(indices.tolist())
        raw = self._maps.maps(query, batch, smooth, method)
        train_images = batch.images.float().cpu()
        own = [self.own_label_class(label) for label in batch.labels]
        test_cam, train_cams = self._reference.gradcams(query, batch.images, own, layer)
        return Explanation(
            test_index=query.index,
            test_image=query.image.float().cpu(),
            test_display=self.to_display(query.image),
            test_label=query.label,
            target=query.target,
            predicted=int(probs.argmax()),
            probabilities=probs.float().cpu(),
            train_indices=indices,
            scores=values,
            train_images=train_images,
            train_display=torch.stack([self.to_display(x) for x in train_images]),
            train_labels=batch.labels,
            tfa_maps_raw=raw,
            gradcam_test=test_cam,
            gradcam_train=train_cams,
            gradcam_layer=self.gradcam_layer_name(layer),
            method=method,
            opponents=opponents,
            smooth=smooth,
        )


def _check_method(method: str) -> str:
    """Return ``method`` after checking it names a registered scorer."""
    if method not in SCORERS:
        raise InputError(f"unknown scoring method {method!r}; choose one of {tuple(SCORERS)}")
    return method


def _needs_checkpoints(method: str) -> bool:
    """Whether the scorer ``method`` sums over TracIn checkpoints (its ``needs``)."""
    return "checkpoints" in SCORERS[method].needs
