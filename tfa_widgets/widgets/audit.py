"""What the training-set views need from the engine, computed once and cached, and the audit.

The audit ranks training images by how often, and how strongly, they are among the top-k
proponents of the misclassified test images; the self-influence ranking orders them by their
score against themselves (grad-dot: ``‖g_i‖²``), the usual way to surface mislabelled images.
"""

from __future__ import annotations

import html

import numpy as np
import torch
from tqdm.auto import tqdm

from tfa_widgets.core.memory_cache import BytesLRU
from tfa_widgets.widgets.labels import as_label, own_class
from tfa_widgets.widgets.view import View

SCORE_CACHE_BYTES = 64 * 2**20  # scores of every training image: 5 MB at N = 1.28M
PICTURE_CACHE_BYTES = 64 * 2**20  # display images: 108 such 224x224 pictures
EMBEDDING_CACHE_BYTES = 32 * 2**20  # 2-D maps: 8 bytes per training image and method
RANKING_CACHE_BYTES = 64 * 2**20  # rankings of every training image: 10 MB each at N = 1.28M
AUDIT_CHUNK = 64


class TrainingData:
    """Scores, labels, pictures and embeddings of the training set, from the engine, cached.

    Parameters
    ----------
    engine : TFAEngine
        Answers every question; nothing here computes gradients.
    mistakes : callable
        Returns the test indices the audit covers, given a true class (or None for all).
    """

    def __init__(self, engine, mistakes) -> None:
        self.engine = engine
        self.mistakes = mistakes
        self.class_names = tuple(engine.class_names)
        self._labels: np.ndarray | None = None
        self._pictures = BytesLRU(PICTURE_CACHE_BYTES)
        self._scores = BytesLRU(SCORE_CACHE_BYTES)
        self._embeddings = BytesLRU(EMBEDDING_CACHE_BYTES)
        self._rankings = BytesLRU(RANKING_CACHE_BYTES)

    def labels(self) -> np.ndarray:
        """Return the class of every training image ``[N]`` (its first positive if multi-label)."""
        if self._labels is None:
            train = self.engine.train_set
            stored = getattr(train, "labels", None)
            raw = stored if stored is not None else [train[i][1] for i in range(len(train))]
            self._labels = np.array([own_class(as_label(y)) or 0 for y in raw], dtype=np.int64)
        return self._labels

    def pictures(self, indices) -> np.ndarray:
        """Return display images ``[n, H, W, 3]`` of training images ``indices`` (cached)."""
        pictures = []
        for i in indices:
            if i not in self._pictures:
                image = self.engine.train_set[int(i)][0]
                self._pictures[i] = self.engine.to_display(image).numpy()
            pictures.append(self._pictures[i])
        return np.stack(pictures)

    def scores(self, view: View) -> np.ndarray:
        """Return the score of every training image for ``view``'s test image, target, scorer."""
        e = view.explanation
        key = (view.key, e.method)
        if key not in self._scores:
            scores = self.engine.scores(view.test, target=e.target, method=e.method)
            self._scores[key] = scores.numpy()
        return self._scores[key]

    def top_k(self, view: View, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the top-k of ``view`` under scorer ``method`` (same test, target, direction)."""
        e = view.explanation
        return self.engine.top_k(
            view.test, e.k, target=e.target, opponents=e.opponents, method=method
        )

    def embedding_methods(self) -> list[tuple[str, str]]:
        """Return the 2-D embeddings available: PCA, and UMAP when umap-learn is installed."""
        try:
            import umap  # noqa: F401
        except ImportError:
            return [("PCA", "pca")]
        return [("PCA", "pca"), ("UMAP", "umap")]

    def embedding(self, method: str = "pca") -> np.ndarray:
        """Return a 2-D embedding ``[N, 2]`` of the index features (computed once per method)."""
        if method not in self._embeddings:
            features = self._features()
            if method == "umap":
                import umap

                reducer = umap.UMAP(n_components=2, random_state=0, verbose=False)
                print(f"UMAP of {len(features)} training gradients (once; may take minutes)…")
                xy = reducer.fit_transform(features.numpy())
            else:
                _, _, basis = torch.pca_lowrank(features, q=2, center=True)
                xy = ((features - features.mean(dim=0)) @ basis[:, :2]).numpy()
            self._embeddings[method] = np.asarray(xy, dtype=np.float32)
        return self._embeddings[method]

    def _features(self) -> torch.Tensor:
        index = self.engine.build_index()
        index = index[-1] if isinstance(index, list) else index
        return index.features.detach().float().cpu()

    def self_influence_methods(self) -> list[str]:
        """Return the scorers a self-influence ranking can use: every one `TFAEngine.self_scores`
        answers (all but grad-cos, which is 1 for every image)."""
        return [m for m in self.engine.methods if m != "grad_cos"]

    def self_influence(self, method: str = "grad_dot") -> np.ndarray:
        """Return every training image's score against itself under ``method``, ``[N]``.

        grad-dot: ``‖g_i‖²``; TracIn-CP: ``Σ_c η_c ‖g_i^c‖²`` (`TFAEngine.self_scores`).
        """
        return self.engine.self_scores(method=method).numpy()

    def self_influence_ranking(self, method: str = "grad_dot") -> np.ndarray:
        """Return training indices by decreasing self-influence under ``method`` (cached)."""
        return self.ranking(
            ("self", method), lambda: np.argsort(-self.self_influence(method), kind="stable")
        )

    def ranking(self, key: tuple, compute) -> np.ndarray:
        """Return the ranking stored under ``key``, else ``compute()``, stored (bytes-bounded)."""
        stored = self._rankings.get(key)
        if stored is None:
            stored = self._rankings[key] = compute()
        return stored

    def info_table(self, index: int) -> str:
        """Return an HTML table of training image ``index``'s label and metadata."""
        rows = {"training index": str(index), "label": self.class_names[self.labels()[index]]}
        info = getattr(self.engine.train_set, "item_info", None)
        if callable(info):
            rows.update({str(k): str(v) for k, v in info(index).items()})
        cells = "".join(
            f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
            for k, v in rows.items()
        )
        return f"<table class='tfa-meta'>{cells}</table>"


def audit_rankings(
    data: TrainingData, true_class: int | None, k: int, progress: bool = True
) -> tuple[np.ndarray, int]:
    """Return training indices ranked by their proponent weight over mistakes, and how many tests.

    Each misclassified test image (of ``true_class``, or all) contributes, for each of its top-k
    proponents (for its predicted class, by grad-cos), ``1 + score`` (grad-cos lies in [-1, 1]):
    images that appear often and strongly come first. Images never among them come last.
    """
    tests = list(data.mistakes(true_class))
    weight = np.zeros(len(data.labels()), dtype=np.float64)
    for indices, scores in _top_ks(data.engine, tests, k, progress):
        np.add.at(weight, indices.numpy(), 1.0 + scores.double().numpy())
    return np.argsort(-weight, kind="stable"), len(tests)


def _top_ks(engine, tests: list[int], k: int, progress: bool):
    """Yield ``(indices, scores)`` of the grad-cos top-k of each test, one engine call per chunk."""
    bar = tqdm(total=len(tests), desc="Auditing mistakes", disable=not progress, leave=False)
    try:
        for start in range(0, len(tests), AUDIT_CHUNK):
            chunk = tests[start : start + AUDIT_CHUNK]
            indices, scores = engine.top_k(chunk, k, method="grad_cos")
            yield from zip(
                indices.reshape(len(chunk), -1), scores.reshape(len(chunk), -1), strict=True
            )
            bar.update(len(chunk))
    finally:
        bar.close()
