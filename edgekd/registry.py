"""Name -> object registries (models, distillers, ...). No global mutable state beyond registration at import."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import EdgekdError
from .validate import did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, list_hint: str = ""):
        self.kind = kind
        self.list_hint = list_hint  # e.g. "`edgekd models` lists them"
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; usable as a decorator. Registering a name twice is a programming error."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise EdgekdError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hint = did_you_mean(name, self._items)
        tail = f" ({self.list_hint})" if self.list_hint else ""
        return f"unknown {self.kind} '{name}'{hint}{tail}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
