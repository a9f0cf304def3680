"""Datasets of the accuracy table: Fashion-MNIST (the embedded default) and ImageNet folders."""
from .fashion_mnist import DEFAULT_DIR, DataError, load, locate

__all__ = ["DEFAULT_DIR", "DataError", "load", "locate"]
