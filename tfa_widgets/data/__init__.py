"""Data for tfa-widgets: the embedded demo (generated shapes with planted shortcuts and harmful
examples, and a small CNN trained on them) and adapters for real datasets already on disk.

Names are imported when first used, so the demo does not pay for the adapters' imports (the
ImageFolder adapter imports torchvision, about 170 MB resident in each explorer kernel).
"""

import importlib

_SOURCES = {
    "Demo": "demo",
    "DemoConfig": "demo_data",
    "DemoMetadata": "demo_data",
    "DemoResNet": "model",
    "HarmfulGroup": "demo_data",
    "ImageFolderDataset": "imagefolder",
    "InMemoryImageDataset": "datasets",
    "Normalization": "transforms",
    "VOCDataset": "voc",
    "VOC_CLASSES": "voc",
    "cache_dir": "cache",
    "evaluate_demo": "demo",
    "generate_demo": "demo_data",
    "load_checkpoint": "checkpoints",
    "load_cifar10": "cifar",
    "load_demo": "demo",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        return getattr(importlib.import_module(f"tfa_widgets.data.{_SOURCES[name]}"), name)
    raise AttributeError(f"module 'tfa_widgets.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
