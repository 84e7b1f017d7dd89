"""Data for tfa-widgets: the embedded demo (generated shapes with planted shortcuts and harmful
examples, and a small CNN trained on them) and adapters for real datasets already on disk."""

from tfa_widgets.data.cache import cache_dir
from tfa_widgets.data.checkpoints import load_checkpoint
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.demo import Demo, evaluate_demo, load_demo
from tfa_widgets.data.demo_data import DemoConfig, DemoMetadata, HarmfulGroup, generate_demo
from tfa_widgets.data.model import DemoResNet
from tfa_widgets.data.transforms import Normalization

__all__ = [
    "Demo",
    "DemoConfig",
    "DemoMetadata",
    "DemoResNet",
    "HarmfulGroup",
    "InMemoryImageDataset",
    "Normalization",
    "cache_dir",
    "evaluate_demo",
    "generate_demo",
    "load_checkpoint",
    "load_demo",
]
