"""The TFA engine: one facade over gradients, index, scorers, TFA maps and Grad-CAM."""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tfa_widgets.core import gradcam as cam
from tfa_widgets.core.allocator import keep_freed_memory
from tfa_widgets.core.errors import DatasetError, IndexCacheError, InputError, NonFiniteError
from tfa_widgets.core.explanation import Explanation, SmoothGrad
from tfa_widgets.core.fingerprint import combine, dataset_fingerprint, state_fingerprint
from tfa_widgets.core.gradients import GradientModel, batched_apply
from tfa_widgets.core.index import FORMAT_VERSION, GradientIndex, build_index
from tfa_widgets.core.losses import check_loss, encode_class, encode_labels, probabilities
from tfa_widgets.core.maps import noisy_copies, reduce_maps
from tfa_widgets.core.params import ParamSpec, ensure_eval, model_state, select_parameter_names
from tfa_widgets.core.projection import SKETCH_VERSION
from tfa_widgets.core.scorers import check_method, score
from tfa_widgets.core.validation import (
    check_class,
    check_finite,
    check_image,
    check_indices,
    check_k,
)

TestInput = int | torch.Tensor
Target = int | str | None


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
        Map-style datasets yielding ``(image [C, H, W], label)``.
    loss : {"cross_entropy", "bce"}
        Single-label cross-entropy, or multi-label BCE with logits (multi-hot labels).
    params : names, modules or parameters, optional
        Parameters gradients are taken over; all trainable ones by default.
    method : {"grad_cos", "grad_dot", "tracin_cp"}
        Default scorer; each query may override it.
    device : str or torch.device, optional
        Where to compute; the model's device by default.
    cache_dir : path, optional
        Where the gradient index is kept; no disk cache when ``None``.
    display : callable, optional
        Maps a model-space image ``[C, H, W]`` to RGB ``[H, W, 3]`` in [0, 1].
    checkpoints : list of (state_dict, learning_rate), optional
        TracIn-CP checkpoints.
    batch_size : int
        Images per batch when computing gradients, scores and maps.
    memory_budget_mb : float
        Exact gradients are stored while ``N × P × 4`` bytes fit; otherwise projections.
    projection_dim : int
        Dimension of projected gradients.
    projection_seed : int
        Seed of the random projection.
    rescore : int
        With a projected index, ``max(rescore, 2k)`` candidates are re-scored exactly by
        ``top_k``.
    strategy : {"auto", "factored", "vmap"}
        How per-example gradients are batched (see `GradientModel`).
    progress : bool
        Show progress bars for the slow steps (fingerprinting the data, building the index,
        exact scores).

    Raises
    ------
    InputError
        When the model is not an ``nn.Module``, a setting is unknown, ``params`` selects
        nothing, or ``method="tracin_cp"`` has no checkpoints.
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
        rescore: int = 16,
        strategy: str = "auto",
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_dataset(train_set, "training set")
        if test_set is not None:
            _check_dataset(test_set, "test set")
        self.loss = check_loss(loss)
        self.method = check_method(method)
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
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.display = display
        self.batch_size = batch_size
        self.memory_budget_mb = memory_budget_mb
        self.projection_dim = projection_dim
        self.projection_seed = projection_seed
        self.rescore = rescore
        self.progress = progress
        self.strategy = strategy
        self.index_builds = 0
        self.param_names = select_parameter_names(self.model, params)
        self.image_shape = tuple(_item(train_set, 0, "training set")[0].shape)
        self.dtype = next(iter(model_state(self.model).values())).dtype
        self.num_classes = int(self._logits(self._train_images([0])).shape[1])
        self.class_names = _class_names(train_set, self.num_classes)
        self._model_term = _Term("model", self._gradient_model(None), 1.0)
        self._checkpoint_terms = [
            _Term(f"checkpoint-{i}", self._gradient_model(state), float(rate))
            for i, (state, rate) in enumerate(checkpoints or [])
        ]
        if self.method == "tracin_cp" and not self._checkpoint_terms:
            raise InputError("method 'tracin_cp' needs checkpoints: a list of (state_dict, lr)")
        self._layers: dict = {}
        self._test_grads: OrderedDict = OrderedDict()
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
            self.model, self.param_names, self.loss, state, self.batch_size, self.strategy
        )

    def _terms(self, method: str) -> list[_Term]:
        if method == "tracin_cp":
            if not self._checkpoint_terms:
                raise InputError("method 'tracin_cp' needs checkpoints given to the engine")
            return self._checkpoint_terms
        return [self._model_term]

    @property
    def methods(self) -> list[str]:
        """The scoring methods this engine can use (TracIn-CP only when given checkpoints)."""
        return ["grad_cos", "grad_dot"] + (["tracin_cp"] if self._checkpoint_terms else [])

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
        targets = encode_labels(labels, self.loss, self.num_classes).to(self.device)
        if targets.is_floating_point():
            targets = targets.to(self.dtype)
        return images, targets

    def _resolve_test(self, test: TestInput) -> tuple[int | None, torch.Tensor, object]:
        if isinstance(test, torch.Tensor):
            image = check_image(test, self.image_shape, "test image")
            return None, image.to(self.device, self.dtype), None
        if isinstance(test, bool) or not isinstance(test, int):
            raise InputError(
                f"test must be an index into the test set or an image tensor, got {test!r}"
            )
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
        return probabilities(self._logits(image[None])[0], self.loss)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(images)

    # ----------------------------------------------------------------- index
    def _fingerprint_parts(self, term: _Term) -> dict:
        if self._data_fingerprint is None:
            self._data_fingerprint = dataset_fingerprint(self.train_set, self.progress)
        weights = {n: t for n, t in term.gradients.params.items()}
        weights.update(term.gradients.frozen)
        return {
            "weights": state_fingerprint(weights),
            "model": type(self.model).__qualname__,
            "data": self._data_fingerprint,
            "params": combine(names=term.gradients.names),
            "loss": self.loss,
            "storage": combine(
                format=FORMAT_VERSION,
                sketch=SKETCH_VERSION,
                budget=self.memory_budget_mb,
                dim=self.projection_dim,
                seed=self.projection_seed,
            ),
            "role": term.role,
        }

    def _index_path(self, parts: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        slot = combine(**{k: v for k, v in parts.items() if k != "weights"})[:20]
        return self.cache_dir / f"gradient-index-{slot}.safetensors"

    def build_index(self, method: str | None = None) -> GradientIndex | list[GradientIndex]:
        """Build (or load from the cache) the gradient index the scorer needs.

        A cached index whose fingerprint does not match, or that is truncated or corrupt, is
        reported (a warning) and rebuilt.

        Parameters
        ----------
        method : str, optional
            The scorer whose index is built (the engine's default when ``None``).

        Returns
        -------
        GradientIndex or list of GradientIndex
            The index, or one index per checkpoint for TracIn-CP.
        """
        method = check_method(method or self.method)
        indexes = [self._ensure_index(term) for term in self._terms(method)]
        return indexes if method == "tracin_cp" else indexes[0]

    def _ensure_index(self, term: _Term) -> GradientIndex:
        if term.index is not None:
            return term.index
        parts = self._fingerprint_parts(term)
        fingerprint = combine(**parts)
        path = self._index_path(parts)
        if path is not None and path.exists():
            try:
                term.index = GradientIndex.load(path, fingerprint)
            except IndexCacheError as error:
                warnings.warn(f"{error}; rebuilding it", stacklevel=3)
        if term.index is None:
            term.index = build_index(
                term.gradients,
                self._train_batch,
                self.num_train,
                fingerprint=fingerprint,
                batch_size=self.batch_size,
                memory_budget_mb=self.memory_budget_mb,
                projection_dim=self.projection_dim,
                projection_seed=self.projection_seed,
                parts=parts,
                progress=self.progress,
            )
            self.index_builds += 1
            if path is not None:
                term.index.save(path)
        term.index.features = term.index.features.to(self.device)
        term.index.norms = term.index.norms.to(self.device)
        return term.index

    # ----------------------------------------------------------------- queries
    def predict(self, test: TestInput) -> torch.Tensor:
        """Return the class probabilities of a test image, ``[num_classes]``.

        Parameters
        ----------
        test : int or torch.Tensor
            An index into the test set, or an image ``[C, H, W]`` in model space.

        Returns
        -------
        torch.Tensor
            Softmax probabilities (sigmoids for multi-label ``"bce"``), on the CPU.
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
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InputError(
                f"predict_batch needs images [B, C, H, W], got {getattr(images, 'shape', images)!r}"
            )
        for i, image in enumerate(images):
            check_image(image, self.image_shape, f"image {i} of the batch")
        logits = self._logits(images.to(self.device, self.dtype))
        return probabilities(logits, self.loss).float().cpu()

    def _test_gradient(self, term: _Term, test: TestInput, image: torch.Tensor, target: int):
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
            self._test_grads[key] = gradient
            if len(self._test_grads) > 64:
                self._test_grads.popitem(last=False)
        return self._test_grads[key]

    def _prepare(self, test: TestInput, target: Target):
        """Resolve the test input and the target class (a forward pass only if it needs one)."""
        index, image, label = self._resolve_test(test)
        return index, image, label, self._resolve_target(target, label, image)

    def scores(
        self,
        test: TestInput,
        target: Target = None,
        method: str | None = None,
        exact: bool = False,
    ) -> torch.Tensor:
        """Return the score of every training image for this test image and target, ``[N]``.

        Exact when the index holds exact gradients. From projected gradients otherwise
        (``top_k`` re-scores its candidates exactly), unless ``exact``: then every training
        image is re-scored exactly, by one forward-mode pass over the training set.

        Parameters
        ----------
        test : int or torch.Tensor
            An index into the test set, or an image ``[C, H, W]`` in model space.
        target : None, "predicted", "true" or int
            The class explained: the predicted class by default, the test label with
            ``"true"``, or a class index.
        method : str, optional
            The scorer (the engine's default when ``None``).
        exact : bool
            Re-score every training image exactly when the index is projected.

        Returns
        -------
        torch.Tensor
            One score per training image, ``[N]``, on the CPU.
        """
        method = check_method(method or self.method)
        _, image, _, target = self._prepare(test, target)
        projected = any(self._ensure_index(term).projected for term in self._terms(method))
        if not (exact and projected):
            return self._index_scores(test, image, target, method).float().cpu()
        chunks = torch.arange(self.num_train).split(self.batch_size)
        rescored = [
            self._exact_scores(test, image, target, method, chunk)
            for chunk in tqdm(chunks, desc="exact scores", unit="batch", disable=not self.progress)
        ]
        return torch.cat(rescored).float().cpu()

    def _index_scores(self, test, image, target: int, method: str) -> torch.Tensor:
        total = None
        for term in self._terms(method):
            index = self._ensure_index(term)
            test_grad = self._test_gradient(term, test, image, target)
            part = term.rate * score(method, index.dots(test_grad), index.norms, test_grad.norm())
            total = part if total is None else total + part
        return total

    def _exact_scores(self, test, image, target: int, method: str, indices: torch.Tensor):
        images, targets = self._train_batch(indices.tolist())
        total = None
        for term in self._terms(method):
            index = self._ensure_index(term)
            test_grad = self._test_gradient(term, test, image, target)
            dots = batched_apply(
                functools.partial(term.gradients.dots_along, direction=test_grad),
                self.batch_size,
                images,
                targets,
            )
            norms = index.norms[indices.to(index.norms.device)].to(dots)
            part = term.rate * score(method, dots, norms, test_grad.norm())
            total = part if total is None else total + part
        return total

    def top_k(
        self,
        test: TestInput,
        k: int,
        target: Target = None,
        opponents: bool = False,
        method: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return indices and scores of the ``k`` highest (or lowest) scoring training images.

        With a projected index the ``max(rescore, 2k)`` best candidates are re-scored exactly
        and ranked by their exact scores.

        Parameters
        ----------
        test : int or torch.Tensor
            An index into the test set, or an image ``[C, H, W]`` in model space.
        k : int
            How many training images, ``1 <= k <= N``.
        target : None, "predicted", "true" or int
            The class explained: the predicted class by default, the test label with
            ``"true"``, or a class index.
        opponents : bool
            The lowest scores (working against the prediction) instead of the highest.
        method : str, optional
            The scorer (the engine's default when ``None``).

        Returns
        -------
        indices : torch.Tensor
            Training indices ``[k]``, best first.
        scores : torch.Tensor
            Their scores ``[k]``.
        """
        method = check_method(method or self.method)
        k = check_k(k, self.num_train)
        _, image, _, target = self._prepare(test, target)
        return self._top_k(test, image, target, k, opponents, method)

    def _top_k(self, test, image, target, k, opponents, method):
        sign = -1.0 if opponents else 1.0
        approximate = self._index_scores(test, image, target, method)
        projected = any(t.index.projected for t in self._terms(method))
        if not projected:
            values, indices = (sign * approximate).topk(k)
            return indices.cpu(), (sign * values).float().cpu()
        pool = min(self.num_train, max(self.rescore, 2 * k))
        candidates = (sign * approximate).topk(pool).indices.cpu()
        exact = self._exact_scores(test, image, target, method, candidates)
        values, order = (sign * exact).topk(k)
        return candidates[order.cpu()], (sign * values).float().cpu()

    def tfa_maps(
        self,
        test: TestInput,
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
            An index into the test set, or an image ``[C, H, W]`` in model space.
        train_indices : sequence of int or torch.Tensor
            The training images to map (e.g. from `top_k`).
        target : None, "predicted", "true" or int
            The class explained: the predicted class by default, the test label with
            ``"true"``, or a class index.
        smooth : SmoothGrad, optional
            SmoothGrad settings; plain maps when ``None``.
        method : str, optional
            The scorer (the engine's default when ``None``).

        Returns
        -------
        torch.Tensor
            Per-channel maps ``[k, C, H, W]`` on the CPU (reduce them with
            ``tfa_widgets.core.maps.reduce_maps``).
        """
        method = check_method(method or self.method)
        indices = check_indices(train_indices, self.num_train)
        _, image, _, target = self._prepare(test, target)
        return self._tfa_maps(test, image, target, indices, smooth, method)

    def _tfa_maps(self, test, image, target, indices, smooth, method) -> torch.Tensor:
        if smooth is not None and not isinstance(smooth, SmoothGrad):
            raise InputError(f"smooth must be None or a SmoothGrad, got {smooth!r}")
        images, targets = self._train_batch(indices.tolist())
        repeats = smooth.n if smooth is not None else 1
        if smooth is not None:
            images = noisy_copies(images, smooth)
            targets = targets.repeat_interleave(repeats, dim=0)
        total = torch.zeros_like(images)
        for term in self._terms(method):
            test_grad = self._test_gradient(term, test, image, target)
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
            ReLU-ed maps, min-max scaled per image and resized to the input.

        Raises
        ------
        InputError
            When the image is not ``[C, H, W]`` or ``[B, C, H, W]``, a target is out of range,
            or the layer is unknown.
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
        targets = (
            [target] * len(batch)
            if isinstance(target, int | torch.Tensor) and torch.as_tensor(target).dim() == 0
            else list(target)
        )
        targets = [check_class(t, self.num_classes) for t in targets]
        module = self._layer(layer, batch)
        maps = cam.gradcam(self.model, batch, targets, module).float().cpu()
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
        """
        image = check_image(image, self.image_shape).to(self.device, self.dtype)
        target = check_class(target, self.num_classes)
        return cam.saliency(self.model, image[None], [target])[0].float().cpu()

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
            The picture, clamped to [0, 1].

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
        test: TestInput,
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
            An index into the test set, or an image ``[C, H, W]`` in model space.
        k : int
            How many training images.
        target : None, "predicted", "true" or int
            The class explained: the predicted class by default, the test label with
            ``"true"``, or a class index.
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
        """
        method = check_method(method or self.method)
        k = check_k(k, self.num_train)
        if reduction not in ("signed", "abs"):
            raise InputError(f"unknown channel reduction {reduction!r}; choose 'signed' or 'abs'")
        index, image, label, target = self._prepare(test, target)
        probs = self._probabilities(image)
        indices, values = self._top_k(test, image, target, k, opponents, method)
        raw = self._tfa_maps(test, image, target, indices, smooth, method)
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


def _check_dataset(dataset: Dataset, name: str) -> None:
    try:
        size = len(dataset)
    except TypeError as error:
        raise DatasetError(f"the {name} must be a map-style Dataset with a length") from error
    if size == 0:
        raise DatasetError(f"the {name} is empty")


def _item(dataset: Dataset, i: int, name: str):
    item = dataset[i]
    if not (isinstance(item, tuple | list) and len(item) >= 2):
        raise DatasetError(
            f"the {name} must yield (image, label) pairs; item {i} is {type(item).__name__}"
        )
    image = item[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise DatasetError(
            f"the {name} must yield image tensors [C, H, W]; item {i} has "
            f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
        )
    return image, item[1]


def _class_names(dataset: Dataset, num_classes: int) -> list[str]:
    names = getattr(dataset, "classes", None)
    if isinstance(names, Sequence) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _test_key(test: TestInput, image: torch.Tensor):
    if isinstance(test, int):
        return ("index", test)
    data = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return ("image", hashlib.sha1(data).hexdigest())
