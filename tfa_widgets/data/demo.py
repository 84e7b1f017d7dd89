"""``load_demo()``: the generated demo dataset and a small CNN trained on it, cached on disk."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tfa_widgets.data.cache import cache_dir as default_cache_dir
from tfa_widgets.data.cache import write_atomic
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.demo_checkpoints import (
    Checkpoint,
    CheckpointRecorder,
    load_checkpoints,
    save_checkpoints,
)
from tfa_widgets.data.demo_data import GENERATOR_VERSION, DemoConfig, DemoMetadata
from tfa_widgets.data.demo_store import load_demo_data
from tfa_widgets.data.model import DemoResNet
from tfa_widgets.data.train import TrainConfig, train_classifier
from tfa_widgets.data.transforms import Normalization

if TYPE_CHECKING:
    from tfa_widgets.core.engine import TFAEngine

MODEL_VERSION = "2"  # 2: CPU-independent initial weights, fixed training threads
WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"


@dataclass
class Demo:
    """The embedded demo: a trained model, its data, and everything planted in the data.

    Made by `load_demo`; ``demo.engine()`` gives a `TFAEngine` on it.

    Parameters
    ----------
    model : nn.Module
        The trained `DemoResNet`, in eval mode.
    train_set, test_set : InMemoryImageDataset
        The generated images with their labels, object masks and notes.
    class_names : list of str
        The class names in label order (the six shapes, or the ten digits).
    metadata : DemoMetadata
        Everything planted: patch boxes, flipped labels, two-object images, harmful groups.
    display : Normalization
        Turns a model-space image into RGB for display.
    cache_dir : Path
        The folder holding the cached weights of this demo.
    stats : dict
        Training time and test figures (`evaluate_demo`), recorded when the model was trained.
    train_config : TrainConfig
        The training settings the model was trained with (part of the cached weights' key).
    checkpoints : list of (state_dict, float)
        TracIn checkpoints recorded along the same training run, with their learning rates
        (`tfa_widgets.data.demo_checkpoints`); the last one holds the final weights.
    """

    model: nn.Module
    train_set: InMemoryImageDataset
    test_set: InMemoryImageDataset
    class_names: list[str]
    metadata: DemoMetadata
    display: Normalization
    cache_dir: Path
    stats: dict = field(default_factory=dict)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def engine(self, **kwargs) -> TFAEngine:
        """Return a ``TFAEngine`` on the demo (display, index cache dir and TracIn checkpoints set;
        kwargs win).

        Parameters
        ----------
        **kwargs
            Keyword arguments of `TFAEngine`; ``display``, ``cache_dir`` and ``checkpoints``
            default to the demo's.

        Returns
        -------
        TFAEngine
            An engine on the demo model, training set and test set.
        """
        from tfa_widgets.core.engine import TFAEngine

        kwargs.setdefault("display", self.display)
        kwargs.setdefault("cache_dir", self.cache_dir.parent / "index")
        kwargs.setdefault("checkpoints", self.checkpoints or None)
        return TFAEngine(self.model, self.train_set, self.test_set, **kwargs)

    @torch.no_grad()
    def predictions(self, split: str = "test") -> torch.Tensor:
        """Return the model's predicted class of every image of ``split`` ("train" or "test").

        Parameters
        ----------
        split : {"train", "test"}
            Which images.

        Returns
        -------
        torch.Tensor
            Predicted class indices, ``[N]`` long.
        """
        data = {"train": self.train_set, "test": self.test_set}[split]
        return torch.cat([self.model(x).argmax(1) for x in data.images.split(256)])


def demo_fingerprint(
    seed: int, config, train: TrainConfig, generator: str = GENERATOR_VERSION
) -> str:
    """Return the cache key of a demo model: seed, generator, data, model and training settings."""
    key = json.dumps(
        [generator, MODEL_VERSION, seed, asdict(config), asdict(train)], sort_keys=True, default=str
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def initial_model(num_classes: int, seed: int) -> DemoResNet:
    """Return the untrained demo model, its random weights the same on every CPU.

    The weights are drawn in float64 and rounded to float32: torch draws float32 normal samples
    with a vectorised kernel on AVX2 CPUs and a scalar one elsewhere, which differ in the last bit.
    """
    default = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float64)
        try:
            model = DemoResNet(num_classes=num_classes)
        finally:
            torch.set_default_dtype(default)
    return model.float()


def evaluate_demo(demo: Demo) -> dict[str, float]:
    """Return the demo model's clean accuracy, shortcut rate and harmful hit rate on the test set.

    ``shortcut_rate``: share of patched test images of other classes predicted as the shortcut
    class.
    ``harmful_hit_rate``: share of planted near-duplicate test images predicted as the class their
    harmful training images teach.

    Parameters
    ----------
    demo : Demo
        The demo to evaluate.

    Returns
    -------
    dict of str to float
        ``clean_accuracy``, ``shortcut_class_clean_accuracy``, ``shortcut_rate`` and
        ``harmful_hit_rate``, each in [0, 1].
    """
    meta, labels = demo.metadata, demo.test_set.labels
    pred = demo.predictions("test")
    clean = torch.tensor(meta.clean_test_indices)
    patched = torch.tensor(meta.patched_test_other, dtype=torch.long)
    expected = meta.expected_mispredictions
    harmed = torch.tensor(list(expected), dtype=torch.long)
    shortcut_clean = clean[labels[clean] == meta.shortcut_class]
    return {
        "clean_accuracy": float((pred[clean] == labels[clean]).float().mean()),
        "shortcut_class_clean_accuracy": float(
            (pred[shortcut_clean] == meta.shortcut_class).float().mean()
        ),
        "shortcut_rate": float((pred[patched] == meta.shortcut_class).float().mean()),
        "harmful_hit_rate": float(
            (pred[harmed] == torch.tensor(list(expected.values()))).float().mean()
        ),
    }


def _load_weights(model: nn.Module, path: Path) -> bool:
    """Load cached weights into ``model``; warn and return False when the file is unusable."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # any unreadable or mismatched cache file means: retrain
        warnings.warn(f"demo model cache {path} is unreadable ({err}); retraining", stacklevel=3)
        return False
    return True


def _save(model: nn.Module, stats: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    write_atomic(folder / STATS_FILE, lambda tmp: tmp.write_text(json.dumps(stats, indent=2)))


def load_demo(
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    config: DemoConfig | None = None,
    train_config: TrainConfig | None = None,
) -> Demo:
    """Return the demo: generated data and a model trained on it (loaded from cache when present).

    Parameters
    ----------
    seed : int
        Seeds data generation and training; the same seed gives the same data and weights.
    cache_dir : path, optional
        Root cache directory (default ``tfa_widgets.data.cache_dir()``); weights are kept in
        ``<cache_dir>/demo-<fingerprint>/``.
    progress : bool
        Show a progress bar while training.
    config : DemoConfig, optional
        Sizes and planted effects of the data (the defaults when ``None``); the generated data
        are kept in ``<cache_dir>/demo-data-<fingerprint>.npz`` (`load_demo_data`).
    train_config : TrainConfig, optional
        Training settings (the defaults when ``None``).

    Returns
    -------
    Demo
        The data, the trained model and what was planted.
    """
    config = config or DemoConfig()
    train_config = train_config or TrainConfig()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    train_set, test_set, meta = load_demo_data(seed, config, root)
    key = demo_fingerprint(seed, config, train_config)
    return train_or_load(
        train_set, test_set, meta, f"demo-{key}", seed, root, train_config, progress
    )


def train_or_load(
    train_set: InMemoryImageDataset,
    test_set: InMemoryImageDataset,
    meta: DemoMetadata,
    name: str,
    seed: int,
    cache_dir: str | Path | None,
    train_config: TrainConfig,
    progress: bool,
) -> Demo:
    """Return a `Demo` on these data: a `DemoResNet` and its TracIn checkpoints loaded from
    ``<cache_dir>/<name>/``, or trained (seeded by ``seed``) and saved there.

    Weights cached without checkpoints (before they were recorded) are trained again: the run is
    deterministic, so the weights come out the same, now with their checkpoints."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / name
    model = initial_model(len(meta.class_names), seed)
    weights = folder / WEIGHTS_FILE
    stats: dict = {}
    checkpoints = load_checkpoints(folder) if weights.is_file() else None
    if checkpoints is not None and _load_weights(model, weights):
        model.eval()
        if (folder / STATS_FILE).is_file():
            try:
                stats = json.loads((folder / STATS_FILE).read_text())
            except ValueError:
                stats = {}
    else:
        start = time.perf_counter()
        recorder = CheckpointRecorder(train_config.epochs)
        train_classifier(
            model, train_set.images, train_set.labels, train_config, seed, progress, recorder
        )
        stats = {"train_seconds": round(time.perf_counter() - start, 1)}
        checkpoints = recorder.checkpoints
        save_checkpoints(folder, checkpoints)
    for p in model.parameters():
        p.requires_grad_(True)
    demo = Demo(
        model, train_set, test_set, list(meta.class_names), meta, meta.normalization, folder
    )
    if not stats.get("clean_accuracy"):
        stats.update(evaluate_demo(demo))
        stats["parameters"] = sum(p.numel() for p in model.parameters())
        _save(model, stats, folder)
    demo.stats = stats
    demo.train_config = train_config
    demo.checkpoints = checkpoints
    return demo
