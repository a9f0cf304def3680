"""The ``@skippable`` decorator and the ``stash`` / ``pop`` commands.

A skip connection (a ResNet shortcut, a U-Net bridge) carries a tensor past the
layers in between. In a flat ``nn.Sequential`` split across devices, passing it
through every intermediate layer would copy it over every device on the way and
force every layer to forward it. Instead a layer *stashes* it by name and a
later layer *pops* it; the engine moves the tensor straight from the stashing
partition's device to the popping one.

A skippable module's ``forward`` is a generator: ``yield stash('name', x)``
hands over a tensor and ``x = yield pop('name')`` receives one. The decorator
wraps the user's class in :class:`Skippable`, which drives the generator and
talks to the current tracker, so the same module works inside and outside GPipe.
"""

from __future__ import annotations

import inspect
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    FrozenSet,
    Generator,
    Iterable,
    Iterator,
    Optional,
    Set,
    Type,
    cast,
)

from torch import Tensor, nn

from .namespace import DEFAULT_NAMESPACE, Namespace
from .tracker import SkipKey, current_skip_tracker

__all__ = ["skippable", "stash", "pop", "Skippable"]


class stash:
    """The command ``yield stash(name, tensor)``: keep ``tensor`` for a later ``pop(name)``."""

    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: Optional[Tensor]) -> None:
        self.name = name
        self.tensor = tensor


class pop:
    """The command ``tensor = yield pop(name)``: receive what an earlier layer stashed."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Skippable(nn.Module):
    """Base of the classes ``@skippable`` makes; the user's module is ``self.module``.

    The wrapped module sits under the attribute ``module``, so parameter names
    read ``<layer>.module.weight`` as in torchgpipe.
    """

    module_cls: ClassVar[Type[nn.Module]]
    stashable_names: ClassVar[FrozenSet[str]]
    poppable_names: ClassVar[FrozenSet[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = self.module_cls(*args, **kwargs)
        self.namespaces: Dict[str, Namespace] = {}

    def __repr__(self) -> str:
        return f"@skippable({self.module})"

    def namespaced(self, name: str) -> SkipKey:
        """The (namespace, name) key under which ``name`` travels."""
        return self.namespaces.get(name, DEFAULT_NAMESPACE), name

    def stashable(self) -> Iterator[SkipKey]:
        for name in sorted(self.stashable_names):
            yield self.namespaced(name)

    def poppable(self) -> Iterator[SkipKey]:
        for name in sorted(self.poppable_names):
            yield self.namespaced(name)

    def isolate(self, ns: Namespace, *, only: Optional[Iterable[str]] = None) -> "Skippable":
        """Put this layer's skip names (or ``only`` those) into namespace ``ns``; returns self."""
        names: Iterable[str] = self.stashable_names | self.poppable_names if only is None else only
        for name in names:
            self.namespaces[name] = ns
        return self

    def forward(self, input: Any) -> Any:
        tracker = current_skip_tracker()
        poppable: Dict[str, Optional[Tensor]] = {}
        for key in self.poppable():
            try:
                poppable[key[1]] = tracker.load(key)
            except KeyError:
                raise RuntimeError(f"'{key[1]}' has not been stashed before {type(self).__name__} popped it") from None

        stashed: Dict[str, Optional[Tensor]] = {}
        popped: Set[str] = set()

        def on_stash(name: str, tensor: Optional[Tensor]) -> None:
            if name not in self.stashable_names:
                raise RuntimeError(f"'{name}' has not been declared as stashable in @skippable({type(self).__name__})")
            stashed[name] = tensor

        def on_pop(name: str) -> Optional[Tensor]:
            if name not in self.poppable_names:
                raise RuntimeError(f"'{name}' has not been declared as poppable in @skippable({type(self).__name__})")
            if name in popped:
                raise RuntimeError(f"'{name}' has already been popped")
            popped.add(name)
            return poppable[name]

        output = self._drive(input, on_stash, on_pop)

        missing_stash = self.stashable_names - stashed.keys()
        if missing_stash:
            raise RuntimeError(f"{', '.join(sorted(missing_stash))} must be stashed but were not")
        missing_pop = self.poppable_names - popped
        if missing_pop:
            raise RuntimeError(f"{', '.join(sorted(missing_pop))} must be popped but were not")

        for key in self.stashable():
            tracker.save(key, stashed[key[1]])
        return output

    def _drive(
        self,
        input: Any,
        on_stash: Callable[[str, Optional[Tensor]], None],
        on_pop: Callable[[str], Optional[Tensor]],
    ) -> Any:
        """Run the wrapped forward, answering its stash/pop commands."""
        result = self.module(input)
        if not inspect.isgenerator(result):
            return result
        generator = cast(Generator[Any, Any, Any], result)
        try:
            command = next(generator)
            while True:
                if isinstance(command, stash):
                    on_stash(command.name, command.tensor)
                    command = next(generator)
                elif isinstance(command, pop):
                    command = generator.send(on_pop(command.name))
                else:
                    raise TypeError(f"{command!r} is not a command from @skippable (expected stash or pop)")
        except StopIteration as stop:
            return stop.value


def skippable(
    stash: Iterable[str] = (),
    pop: Iterable[str] = (),
) -> Callable[[Type[nn.Module]], Type[Skippable]]:
    """Class decorator declaring the skip names a module stashes and pops.

    >>> @skippable(stash=['identity'])
    ... class Fork(nn.Module):
    ...     def forward(self, x):
    ...         yield stash('identity', x)
    ...         return x
    """
    stashable_names = frozenset(stash)
    poppable_names = frozenset(pop)

    def wrap(module_cls: Type[nn.Module]) -> Type[Skippable]:
        attrs = {
            "module_cls": module_cls,
            "stashable_names": stashable_names,
            "poppable_names": poppable_names,
            "__module__": module_cls.__module__,
            "__qualname__": module_cls.__qualname__,
            "__doc__": module_cls.__doc__,
        }
        return cast(Type[Skippable], type(module_cls.__name__, (Skippable,), attrs))

    return wrap
