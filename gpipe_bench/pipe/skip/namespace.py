"""Namespaces keep skip names of repeated layers apart.

A model built from the same skippable block many times would stash the same
name many times. ``block.isolate(Namespace())`` gives one instance its own
namespace, so each stash pairs with the pop of the same block.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["Namespace"]


class Namespace:
    """An opaque, hashable, ordered identity for a group of skip names."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id = uuid.uuid4()

    def __repr__(self) -> str:
        return f"<Namespace '{self.id}'>"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Namespace) and self.id == other.id

    def __lt__(self, other: "Namespace") -> bool:
        return self.id < other.id


# Names not isolated explicitly share this namespace.
DEFAULT_NAMESPACE = Namespace()
