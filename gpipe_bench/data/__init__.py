"""Datasets of the accuracy table: Fashion-MNIST (the embedded default) and ImageNet folders."""

from __future__ import annotations

from . import fashion_mnist, imagenet
from .fashion_mnist import DEFAULT_DIR, DataError, load, locate

__all__ = ["DEFAULT_DIR", "DataError", "fashion_mnist", "imagenet", "load", "locate"]
