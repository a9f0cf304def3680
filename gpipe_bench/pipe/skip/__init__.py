"""Skip connections across partitions, with torchgpipe 0.0.7's API."""

from .layout import verify_skippables
from .namespace import Namespace
from .skippable import pop, skippable, stash

__all__ = ["skippable", "stash", "pop", "Namespace", "verify_skippables"]
