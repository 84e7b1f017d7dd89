"""Data for tfa-widgets: the embedded demo (generated shapes with planted shortcuts and harmful
examples, and a small CNN trained on them) and adapters for real datasets already on disk."""

from tfa_widgets.data.cache import cache_dir
from tfa_widgets.data.checkpoints import load_checkpoint
from tfa_widgets.data.cifar import load_cifar10
from tfa_widgets.data.datasets import InMemoryImageDataset
from tfa_widgets.data.demo import Demo, evaluate_demo, load_demo
from tfa_widgets.data.demo_data import DemoConfig, DemoMetadata, HarmfulGroup, generate_demo
from tfa_widgets.data.imagefolder import ImageFolderDataset
from tfa_widgets.data.model import DemoResNet
from tfa_widgets.data.transforms import Normalization
from tfa_widgets.data.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "Demo",
    "DemoConfig",
    "DemoMetadata",
    "DemoResNet",
    "HarmfulGroup",
    "ImageFolderDataset",
    "InMemoryImageDataset",
    "Normalization",
    "VOCDataset",
    "VOC_CLASSES",
    "cache_dir",
    "evaluate_demo",
    "generate_demo",
    "load_checkpoint",
    "load_cifar10",
    "load_demo",
]
