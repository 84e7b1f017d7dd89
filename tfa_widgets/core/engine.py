"""The TFA engine: one facade over gradients, index, scorers, TFA maps and Grad-CAM."""

from __future__ import annotations

import functools
import hashlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tfa_widgets.core import gradcam as cam
from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.errors import (
    DatasetError,
    InputError,
    NonFiniteError,
    SaturatedPredictionError,
)
from tfa_widgets.core.explanation import Explanation, SmoothGrad
from tfa_widgets.core.fingerprint import dataset_fingerprint
from tfa_widgets.core.gradients import GradientModel, batched_apply
from tfa_widgets.core.index import GradientIndex, build_index
from tfa_widgets.core.index_store import DEFAULT_BUDGET_MB, IndexStore, index_parts
from tfa_widgets.core.logra import PROJECTIONS
from tfa_widgets.core.losses import (
    check_loss,
    encode_class,
    encode_labels,
    logit_gradient,
    probabilities,
)
from tfa_widgets.core.maps import noisy_copies, reduce_maps
from tfa_widgets.core.memory_cache import BytesLRU
from tfa_widgets.core.outputs import OutputFn, read_logits
from tfa_widgets.core.params import ParamSpec, ensure_eval, model_state, select_parameter_names
from tfa_widgets.core.preconditioned import PRECONDITIONED, PreconditionedScorers
from tfa_widgets.core.queries import (
    Target,
    TestInput,
    split_targets,
    split_tests,
    tests_per_product,
)
from tfa_widgets.core.scorers import METHODS, at_least_float32, query_gradient, score
from tfa_widgets.core.validation import (
    as_integer,
    check_class,
    check_finite,
    check_image,
    check_indices,
    check_k,
)

SingleTest = int | torch.Tensor
_Query = tuple  # (test index or image, image [C, H, W] on the device, target class)


@dataclass
class _Term:
    """One set of weights the scores are summed over (the model, or a TracIn checkpoint)."""

    role: str
    gradients: GradientModel
    rate: float
    index: GradientIndex | None = None


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
        (cross-entropy only) are fitted on first use and kept in memory (see
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
    batch_size : int
        Images per batch when computing gradients, scores and maps.
    memory_budget_mb : float
        Exact gradients are stored while ``N × P × 4`` bytes fit; otherwise projections
        (``0``: always project).
    projection_dim : int
        Dimension of projected gradients.
    projection_seed : int
        Seed of the random projection.
    projection : {"logra", "countsketch"}
        How gradients are projected: factorised per Linear/Conv2d layer (LoGra, see
        `tfa_widgets.core.logra`; models whose layers are not factored fall back to the
        CountSketch) or a CountSketch of the full per-sample gradients (the default: at the same
        ``projection_dim`` it found 0.90 of a ResNet-18's exact top-10 before re-scoring, the
        factorised one 0.60, which builds about 3x faster there; ``benchmarks/scale_build.py``).
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

    Raises
    ------
    InputError
        When the model is not an ``nn.Module``, ``output`` is not callable, a size or budget
        is not a valid number, a setting is unknown, ``params`` selects nothing, a checkpoint
        lacks some of the model's tensors, or ``method="tracin_cp"`` has no checkpoints.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output is not None and not callable(output):
            raise InputError(f"output must map the model's output to logits, got {output!r}")
        _check_integers(batch_size=batch_size, projection_dim=projection_dim)
        _check_integers(minimum=0, rescore=rescore)
        _check_numbers(
            cache_budget_mb=cache_budget_mb, test_gradient_cache_mb=test_gradient_cache_mb
        )
        _check_numbers(minimum=0, memory_budget_mb=memory_budget_mb)  # 0: always project
        _check_dataset(train_set, "training set")
        if test_set is not None:
            _check_dataset(test_set, "test set")
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
        self.output = output
        self.index_store = IndexStore(cache_dir, cache_budget_mb)
        self.cache_dir = self.index_store.directory
        self.display = display
        self.batch_size = batch_size
        self.memory_budget_mb = memory_budget_mb
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.projection = _check_projection(projection)
        self.rescore = rescore
        self.progress = progress
        self.strategy = strategy
        self.index_builds = 0
        self.param_names = select_parameter_names(self.model, params)
        self.image_shape = tuple(_item(train_set, 0, "training set")[0].shape)
        self.dtype = next(iter(model_state(self.model).values())).dtype
        first_image, first_label = self._train_items([0])
        self.num_classes = int(self._logits(first_image).shape[1])
        encode_labels(first_label, self.loss, self.num_classes, [0])
        self.class_names = _class_names(train_set, self.num_classes)
        self._model_term = _Term("model", self._gradient_model(None), 1.0)
        self._checkpoint_terms = [
            _Term(f"checkpoint-{i}", self._gradient_model(state), float(rate))
            for i, (state, rate) in enumerate(checkpoints or [])
        ]
        if self.method == "tracin_cp" and not self._checkpoint_terms:
            raise InputError("method 'tracin_cp' needs checkpoints: a list of (state_dict, lr)")
        self._preconditioned = PreconditionedScorers(
            self._model_term.gradients, self._train_batch, self.num_train, batch_size, progress
        )
        self._layers: dict = {}
        self._test_grads = BytesLRU(int(test_gradient_cache_mb * 2**20))
        self._data_fingerprint: str | None = None

    # ----------------------------------------------------------------- set-up helpers
    def _gradient_model(self, state: dict | None) -> GradientModel:
        own = model_state(self.model)
        if state is not None:
            missing = sorted(set(own) - set(state))
            if missing:
                raise InputError(f"a TracIn checkpoint lacks the model's tensors {missing[:5]}")
            state = {n: torch.as_tensor(state[n]).to(own[n]) for n in own}
        return GradientModel(
            self.model,
            self.param_names,
            self.loss,
            state,
            self.batch_size,
            self.strategy,
            self.output,
        )

    def _terms(self, method: str) -> list[_Term]:
        if method == "tracin_cp":
            if not self._checkpoint_terms:
                raise InputError("method 'tracin_cp' needs checkpoints given to the engine")
            return self._checkpoint_terms
        return [self._model_term]

    @property
    def methods(self) -> list[str]:
        """The scoring methods this engine can use (TracIn-CP only when given checkpoints, TRAK
        only with the cross-entropy loss)."""
        own = ["grad_cos", "grad_dot"] + (["tracin_cp"] if self._checkpoint_terms else [])
        return own + self._preconditioned.methods(self.loss)

    def _check_method(self, method: str) -> str:
        """Return ``method`` after checking this engine can score with it."""
        _check_method(method)
        if method not in self.methods and method != "tracin_cp":  # tracin_cp says what it needs
            raise InputError(f"method {method!r} needs the cross-entropy loss, not {self.loss!r}")
        return method

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_set)

    # ----------------------------------------------------------------- data access
    def _train_items(self, indices: Sequence[int]) -> tuple[torch.Tensor, list]:
        items = [_item(self.train_set, int(i), "training set") for i in indices]
        for i, (image, _) in zip(indices, items, strict=True):
            if tuple(image.shape) != self.image_shape:
                raise DatasetError(
                    f"training image {i} has shape {tuple(image.shape)}, but the first one has "
                    f"{self.image_shape}; all images must share one shape"
                )
        images = torch.stack([image for image, _ in items]).to(self.device, self.dtype)
        return images, [label for _, label in items]

    def _train_images(self, indices: Sequence[int]) -> torch.Tensor:
        return self._train_items(indices)[0]

    def _train_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._train_items(indices)
        targets = encode_labels(labels, self.loss, self.num_classes, indices).to(self.device)
        if targets.is_floating_point():
            targets = targets.to(self.dtype)
        return images, targets

    def _resolve_test(self, test: SingleTest) -> tuple[int | None, torch.Tensor, object]:
        if isinstance(test, torch.Tensor) and test.dim() != 0:
            image = check_image(test, self.image_shape, "test image")
            return None, image.to(self.device, self.dtype), None
        try:
            test = as_integer(test, "test")
        except InputError:
            raise InputError(
                "test must be an index into the test set, an image tensor [C, H, W], a "
                f"sequence of indices or a batch of images [B, C, H, W], got {test!r}"
            ) from None
        if self.test_set is None:
            raise InputError("test is an index, but the engine was given no test_set")
        if not 0 <= test < len(self.test_set):
            raise InputError(
                f"test index {test} is out of range for a test set of size {len(self.test_set)}"
            )
        image, label = _item(self.test_set, test, "test set")
        image = check_image(image, self.image_shape, f"test image {test}")
        return test, image.to(self.device, self.dtype), label

    def _resolve_target(self, target: Target, label: object, image: torch.Tensor) -> int:
        if target is None or target == "predicted":
            return int(self._probabilities(image).argmax())
        if target == "true":
            if label is None:
                raise InputError("target 'true' needs a test index with a label, not a bare image")
            if self.loss == "cross_entropy":
                return check_class(int(label), self.num_classes)
            probs = self._probabilities(image)
            positive = torch.as_tensor(label, dtype=torch.float32).to(probs.device) > 0.5
            if not bool(positive.any()):
                raise InputError("target 'true': this multi-label test image has no positive class")
            return int(torch.where(positive, probs, torch.full_like(probs, -1.0)).argmax())
        if isinstance(target, str):
            raise InputError(
                f"unknown target {target!r}: use None, 'predicted', 'true' or a class index"
            )
        return check_class(target, self.num_classes)

    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return _checked_probabilities(self._logits(image[None]), self.loss)[0]

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return read_logits(self.model(images), self.output)

    # ----------------------------------------------------------------- index
    def _fingerprint_parts(self, term: _Term) -> dict:
        if self._data_fingerprint is None:
            self._data_fingerprint = dataset_fingerprint(self.train_set, self.progress)
        return index_parts(
            term.gradients,
            model_name=type(self.model).__qualname__,
            data_fingerprint=self._data_fingerprint,
            loss=self.loss,
            memory_budget_mb=self.memory_budget_mb,
            projection_dim=self.projection_dim,
            projection_seed=self.projection_seed,
            projection=self.projection,
        )

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
        indexes = [self._ensure_index(term) for term in self._terms(method)]
        return indexes if method == "tracin_cp" else indexes[0]

    def _ensure_index(self, term: _Term) -> GradientIndex:
        if term.index is not None:
            return term.index
        build = functools.partial(self._build_index, term)
        term.index, built = self.index_store.load_or_build(self._fingerprint_parts(term), build)
        self.index_builds += int(built)
        term.index.features = term.index.features.to(self.device)
        term.index.norms = term.index.norms.to(self.device)
        return term.index

    def _build_index(self, term: _Term, fingerprint: str, parts: dict) -> GradientIndex:
        return build_index(
            term.gradients,
            self._train_batch,
            self.num_train,
            fingerprint=fingerprint,
            batch_size=self.batch_size,
            memory_budget_mb=self.memory_budget_mb,
            projection_dim=self.projection_dim,
            projection_seed=self.projection_seed,
            projection=self.projection,
            parts=parts,
            progress=self.progress,
        )

    # ----------------------------------------------------------------- queries
    def predict(self, test: SingleTest) -> torch.Tensor:
        """Return the class probabilities of a test image, ``[num_classes]``.

        Parameters
        ----------
        test : int or torch.Tensor
            One test: an index into the test set, or an image ``[C, H, W]`` in model space.

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
        _, image, _ = self._resolve_test(test)
        return self._probabilities(image).float().cpu()

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
        logits = self._logits(images.to(self.device, self.dtype))
        return _checked_probabilities(logits, self.loss).float().cpu()

    def _test_gradient(self, term: _Term, test: SingleTest, image: torch.Tensor, target: int):
        key = (term.role, _test_key(test, image), target)
        if key not in self._test_grads:
            encoded = encode_class(target, self.loss, self.num_classes).to(self.device)
            if encoded.is_floating_point():
                encoded = encoded.to(self.dtype)
            gradient = term.gradients.gradient(image, encoded)
            if not bool(torch.isfinite(gradient).all()):
                raise NonFiniteError(
                    f"the loss gradient of the test image for class {target} is not finite "
                    "(NaN or inf); check the model weights and the image"
                )
            self._check_not_saturated(term, gradient, image, encoded, target)
            self._test_grads[key] = gradient
        return self._test_grads[key]

    def _check_not_saturated(self, term: _Term, gradient, image, encoded, target: int) -> None:
        """Raise `SaturatedPredictionError` when the test gradient is zero or below float32
        precision because the model is certain of ``target`` (not because the selected
        parameters do not reach the loss: then the scores are truly 0)."""
        tiny = torch.finfo(torch.float32).tiny ** 0.5  # below it a squared norm underflows
        norm = float(at_least_float32(gradient).norm())
        if norm >= tiny:
            return
        logits = self._logits(image[None])[0]
        confident = torch.finfo(torch.float32).eps ** 0.5
        if float(at_least_float32(logit_gradient(logits, encoded, self.loss)).norm()) > confident:
            return
        probs = self._probabilities(image)
        others = logits.float().clone()  # the probabilities of the others may all be 0
        others[target] = -torch.inf
        where = "" if term.role == "model" else f" at TracIn {term.role}"
        amount = "zero" if norm == 0 else f"{norm:.1e}, below float32 precision"
        raise SaturatedPredictionError(
            f"the model is saturated on class {target} for this test image{where} (probability "
            f"{float(probs[target]):.7f}): its loss gradient is {amount}, so every training "
            "image would score 0 and the ranking would be arbitrary. Explain another class "
            f"instead, e.g. target={int(others.argmax())} (the next most probable)"
        )

    def _prepare(self, test: SingleTest, target: Target):
        """Resolve the test input and the target class (a forward pass only if it needs one)."""
        index, image, label = self._resolve_test(test)
        return index, image, label, self._resolve_target(target, label, image)

    def _queries(self, test: TestInput, target: Target | Sequence) -> tuple[list[_Query], bool]:
        """Resolve every test a query names; return ``(test, image, target)`` for each and
        whether the query named a batch."""
        tests, batched = split_tests(test)
        queries = []
        for single, single_target in zip(tests, split_targets(target, len(tests)), strict=True):
            index, image, _, resolved = self._prepare(single, single_target)
            queries.append((image if index is None else index, image, resolved))
        return queries, batched

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
        test : int, torch.Tensor or sequence of int
            One test (an index into the test set, or an image ``[C, H, W]`` in model space) or
            many (a sequence of indices, or a batch ``[B, C, H, W]``).
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
        queries, batched = self._queries(test, target)
        if method in PRECONDITIONED:
            rows = self._preconditioned_scores(queries, method).float().cpu()
            return rows if batched else rows[0]
        projected = any(self._ensure_index(term).projected for term in self._terms(method))
        if exact and projected:
            chunks = torch.arange(self.num_train).split(self.batch_size)
            progress = tqdm(chunks, desc="exact scores", unit="batch", disable=not self.progress)
            rows = torch.cat([self._exact_scores(queries, method, c) for c in progress], dim=1)
        else:
            rows = self._index_scores(queries, method)
        rows = rows.float().cpu()
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
        method = self._check_method(method or self.method)
        if method in PRECONDITIONED:
            raise InputError(f"self_scores does not support {method!r} yet; use 'grad_dot'")
        if method == "grad_cos":
            raise InputError(
                "the grad-cos self-score is 1 for every training image by definition (the "
                "cosine of a gradient with itself); use method='grad_dot' or 'tracin_cp'"
            )
        total = sum(
            term.rate * at_least_float32(self._ensure_index(term).norms).square()
            for term in self._terms(method)
        )
        return total.float().cpu()

    def _preconditioned_scores(self, queries: list[_Query], method: str) -> torch.Tensor:
        """Exact scores ``[B, N]`` of a preconditioned scorer."""
        test_grads = torch.stack([self._test_gradient(self._model_term, *q) for q in queries])
        targets = torch.tensor([target for _, _, target in queries])
        probabilities = torch.stack([self._probabilities(image) for _, image, _ in queries])
        return self._preconditioned.scores(
            method, test_grads, probabilities.gather(1, targets[:, None].to(self.device))[:, 0]
        )

    def _index_scores(self, queries: list[_Query], method: str) -> torch.Tensor:
        """Scores ``[B, N]`` from the index: test gradients against it, a chunk at a time."""
        total = None
        for term in self._terms(method):
            index = self._ensure_index(term)
            rows = []
            group_size = tests_per_product(term.gradients.num_params)
            for start in range(0, len(queries), group_size):
                group = queries[start : start + group_size]
                test_grads = torch.stack(
                    [query_gradient(method, self._test_gradient(term, *query)) for query in group]
                )
                test_norms = at_least_float32(test_grads).norm(dim=1)
                dots = index.dots(test_grads).T
                rows.append(score(method, dots, index.norms[None, :], test_norms[:, None]))
            part = term.rate * torch.cat(rows)
            total = part if total is None else total + part
        return total

    def _exact_scores(self, queries: list[_Query], method: str, indices: torch.Tensor):
        """Exact scores ``[B, len(indices)]`` of some training images, by forward mode."""
        images, targets = self._train_batch(indices.tolist())
        total = None
        for term in self._terms(method):
            index = self._ensure_index(term)
            norms = index.norms[indices.to(index.norms.device)]
            rows = []
            for query in queries:
                test_grad = query_gradient(method, self._test_gradient(term, *query))
                dots = batched_apply(
                    functools.partial(term.gradients.dots_along, direction=test_grad),
                    self.batch_size,
                    images,
                    targets,
                )
                rows.append(score(method, dots, norms.to(dots.device), _norm32(test_grad)))
            part = term.rate * torch.stack(rows)
            total = part if total is None else total + part
        return total

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
        test : int, torch.Tensor or sequence of int
            One test (an index into the test set, or an image ``[C, H, W]`` in model space) or
            many (a sequence of indices, or a batch ``[B, C, H, W]``).
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
        queries, batched = self._queries(test, target)
        indices, values = self._top_k(queries, k, opponents, method)
        return (indices, values) if batched else (indices[0], values[0])

    def _top_k(self, queries: list[_Query], k: int, opponents: bool, method: str):
        sign = -1.0 if opponents else 1.0
        if method in PRECONDITIONED:
            values, indices = (sign * self._preconditioned_scores(queries, method)).topk(k, dim=1)
            return indices.cpu(), (sign * values).float().cpu()
        approximate = self._index_scores(queries, method)
        projected = any(t.index.projected for t in self._terms(method))
        if not projected:
            values, indices = (sign * approximate).topk(k, dim=1)
            return indices.cpu(), (sign * values).float().cpu()
        pool = min(self.num_train, max(self.rescore, 2 * k))
        candidates = (sign * approximate).topk(pool, dim=1).indices.cpu()
        chosen, values = [], []
        for query, row in zip(queries, candidates, strict=True):
            exact = self._exact_scores([query], method, row)[0]
            best, order = (sign * exact).topk(k)
            chosen.append(row[order.cpu()])
            values.append((sign * best).float().cpu())
        return torch.stack(chosen), torch.stack(values)

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
        test : int or torch.Tensor
            One test: an index into the test set, or an image ``[C, H, W]`` in model space.
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
        index, image, _, target = self._prepare(test, target)
        key = image if index is None else index
        return self._tfa_maps(key, image, target, indices, smooth, method)

    def _tfa_maps(self, test, image, target, indices, smooth, method) -> torch.Tensor:
        if smooth is not None and not isinstance(smooth, SmoothGrad):
            raise InputError(f"smooth must be None or a SmoothGrad, got {smooth!r}")
        images, targets = self._train_batch(indices.tolist())
        repeats = smooth.n if smooth is not None else 1
        if smooth is not None:
            images = noisy_copies(images, smooth)
            targets = targets.repeat_interleave(repeats, dim=0)
        if method in PRECONDITIONED:
            test_grad = self._test_gradient(self._model_term, test, image, target)
            probability = self._probabilities(image)[target]
            total = self._preconditioned.maps(method, test_grad, probability, images, targets)
        else:
            total = torch.zeros_like(images)
            for term in self._terms(method):
                test_grad = query_gradient(method, self._test_gradient(term, test, image, target))
                input_grads = functools.partial(
                    term.gradients.input_grads_of_score, method=method, test_grad=test_grad
                )
                total += term.rate * batched_apply(input_grads, self.batch_size, images, targets)
        maps = total.view(len(indices), repeats, *images.shape[1:]).mean(dim=1)
        check_finite(maps, "the TFA maps")
        return maps.float().cpu()

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
        single = isinstance(image, torch.Tensor) and image.dim() == 3
        batch = image[None] if single else image
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise InputError(
                "Grad-CAM needs an image [C, H, W] or a batch [B, C, H, W], "
                f"got {getattr(image, 'shape', image)!r}"
            )
        for row in batch:
            check_image(row, self.image_shape, "Grad-CAM image")
        batch = batch.to(self.device, self.dtype)
        targets = [check_class(t, self.num_classes) for t in cam.targets_for(target, len(batch))]
        module = self._layer(layer, batch)
        maps = cam.gradcam(self.model, batch, targets, module, self.output).float().cpu()
        if not bool(torch.isfinite(maps).all()):
            raise NonFiniteError(
                "Grad-CAM is NaN or infinite: the model's activations or gradients are not "
                "finite; check the model weights (e.g. a training run that diverged)"
            )
        return maps[0] if single else maps

    def _layer(self, layer, batch: torch.Tensor) -> nn.Module:
        key = layer if isinstance(layer, str | type(None)) else id(layer)
        if key not in self._layers:
            self._layers[key] = cam.resolve_layer(self.model, layer, batch)
        return self._layers[key]

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
        image = check_image(image, self.image_shape).to(self.device, self.dtype)
        target = check_class(cam.targets_for(target, 1)[0], self.num_classes)
        return cam.saliency(self.model, image[None], [target], self.output)[0].float().cpu()

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
        test : int or torch.Tensor
            One test: an index into the test set, or an image ``[C, H, W]`` in model space.
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
        return self._prepare(test, target)[3]

    def test_key(self, test: TestInput) -> tuple:
        """Return a hashable key identifying ``test`` (its index, or a hash of the image).

        Parameters
        ----------
        test : int or torch.Tensor
            One test: an index into the test set, or an image ``[C, H, W]`` in model space.

        Returns
        -------
        tuple
            ``("index", i)`` for a test-set index, ``("image", sha1)`` for an image.

        Raises
        ------
        InputError
            When ``test`` is not a valid index or image.
        """
        index, image, _ = self._resolve_test(test)
        return _test_key(test if index is None else index, image)

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
        if self.loss == "cross_entropy":
            return int(label)
        positive = torch.as_tensor(label).reshape(-1).nonzero().flatten()
        return int(positive[0]) if positive.numel() else 0

    def explain(
        self,
        test: SingleTest,
        k: int = 8,
        target: Target = None,
        smooth: SmoothGrad | None = None,
        opponents: bool = False,
        method: str | None = None,
        reduction: str = "signed",
        times_input: bool = False,
    ) -> Explanation:
        """Return everything the explorer shows for one test image: see `Explanation`.

        Parameters
        ----------
        test : int or torch.Tensor
            One test: an index into the test set, or an image ``[C, H, W]`` in model space.
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
        reduction : {"signed", "abs"}
            Channel reduction of ``Explanation.tfa_maps``.
        times_input : bool
            Multiply the maps by the training images before reducing (gradient × input).

        Returns
        -------
        Explanation
            The top-k training images with their scores, TFA maps and Grad-CAM, and the test
            image's prediction and Grad-CAM.

        Raises
        ------
        InputError
            When ``k`` or ``reduction`` is invalid (and, from the steps it runs, any input error
            of `top_k`, `tfa_maps` or `gradcam`).
        SaturatedPredictionError
            When the model is so certain of the target class that the test gradient vanishes.
        """
        method = self._check_method(method or self.method)
        k = check_k(k, self.num_train)
        if reduction not in ("signed", "abs"):
            raise InputError(f"unknown channel reduction {reduction!r}; choose 'signed' or 'abs'")
        index, image, label, target = self._prepare(test, target)
        key = image if index is None else index
        probs = self._probabilities(image)
        indices, values = self._top_k([(key, image, target)], k, opponents, method)
        indices, values = indices[0], values[0]
        raw = self._tfa_maps(key, image, target, indices, smooth, method)
        train_images, labels = self._train_items(indices.tolist())
        train_images = train_images.float().cpu()
        own = [self.own_label_class(label) for label in labels]
        return Explanation(
            test_index=index,
            test_image=image.float().cpu(),
            test_display=self.to_display(image),
            test_label=label,
            target=target,
            predicted=int(probs.argmax()),
            probabilities=probs.float().cpu(),
            train_indices=indices,
            scores=values,
            train_images=train_images,
            train_display=torch.stack([self.to_display(x) for x in train_images]),
            train_labels=labels,
            tfa_maps=reduce_maps(raw, reduction, train_images if times_input else None),
            tfa_maps_raw=raw,
            gradcam_test=self.gradcam(image, target),
            gradcam_train=self.gradcam(train_images, own),
            method=method,
            opponents=opponents,
            smooth=smooth,
            reduction=reduction,
            extras={"times_input": times_input},
        )


def _check_method(method: str) -> str:
    """Return ``method`` after checking it names a supported scorer."""
    if method not in METHODS + PRECONDITIONED:
        raise InputError(
            f"unknown scoring method {method!r}; choose one of {METHODS + PRECONDITIONED}"
        )
    return method


def _check_projection(projection: str) -> str:
    """Return ``projection`` after checking it names a supported projection."""
    if projection not in PROJECTIONS:
        raise InputError(f"unknown projection {projection!r}; choose one of {PROJECTIONS}")
    return projection


def _norm32(test_grad: torch.Tensor) -> torch.Tensor:
    """Return ``‖g_t‖`` in float32 at least (the scores' dots are)."""
    return at_least_float32(test_grad).norm()


def _checked_probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(
            "the model's outputs contain NaN or infinite values; check the model weights "
            "(e.g. a training run that diverged) and the image"
        )
    return probabilities(logits, loss)


def _check_dataset(dataset: Dataset, name: str) -> None:
    try:
        size = len(dataset)
    except TypeError as error:
        raise DatasetError(f"the {name} must be a map-style Dataset with a length") from error
    if size == 0:
        raise DatasetError(f"the {name} is empty")


def _item(dataset: Dataset, i: int, name: str):
    item = dataset[i]
    if not isinstance(item, tuple | list):
        raise DatasetError(
            f"the {name} must yield (image, label) pairs; item {i} is {type(item).__name__}"
        )
    if len(item) != 2:
        raise DatasetError(
            f"the {name} must yield (image, label) pairs; item {i} has {len(item)} elements "
            f"({', '.join(type(x).__name__ for x in item)}). Wrap it in a Dataset whose "
            "__getitem__ returns dataset[i][:2]"
        )
    image = item[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise DatasetError(
            f"the {name} must yield image tensors [C, H, W]; item {i} has "
            f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
        )
    return image, item[1]


def _check_integers(minimum: int = 1, **settings) -> None:
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise InputError(f"{name} must be {kind}, got {value!r}")


def _check_numbers(minimum: float | None = None, **settings) -> None:
    """Check numbers are > 0, or >= ``minimum`` when given."""
    for name, value in settings.items():
        number = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not number or not (value > 0 if minimum is None else value >= minimum):
            kind = "a positive number" if minimum is None else f"a number >= {minimum}"
            raise InputError(f"{name} must be {kind}, got {value!r}")


def _class_names(dataset: Dataset, num_classes: int) -> list[str]:
    names = getattr(dataset, "classes", None)
    if isinstance(names, Sequence) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _test_key(test: SingleTest, image: torch.Tensor):
    if isinstance(test, int):
        return ("index", test)
    data = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return ("image", hashlib.sha1(data).hexdigest())
