"""One registry per kind of named thing (teachers, pools, mechanisms, imitation schedules, problems, architectures,
presets, student types, timm names): lookups, the CLI's choices, its help and its "valid: ..." errors all come from
here. Each registry's entries are of one shape, a frozen dataclass (as timm's ``OptimInfo``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

V = TypeVar("V")


class Registry(dict[str, V], Generic[V]):
    """A dict of named entries of one ``kind``, each with a one-line description."""

    def __init__(self, kind: str, entries: Mapping[str, tuple[V, str]] | None = None):
        super().__init__()
        self.kind = kind
        self.descriptions: dict[str, str] = {}
        for name, (value, description) in (entries or {}).items():
            self.register(name, value, description)

    def register(self, name: str, value: V, description: str = "") -> V:
        """Add an entry (a new student type, teacher, problem ...); names are unique."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = value
        self.descriptions[name] = description
        return value

    def valid(self) -> str:
        return ", ".join(self)

    def lookup(self, name: str) -> V:
        """The entry called ``name``, or a ValueError naming the valid choices."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {self.valid()}")
        return self[name]

    def help(self) -> str:
        """``name (description); ...``: what a CLI option's help lists."""
        return "; ".join(f"{n} ({d})" if d else n for n, d in self.descriptions.items())
