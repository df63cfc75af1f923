"""Adding an entry to one of the registries (objectives, datasets) from outside the package: one rule
for all of them, so a name means one thing. A leaf: it imports nothing of prefopt."""

from __future__ import annotations


def add_entry(registry: dict, name: str, entry, entry_type: type, kind: str) -> None:
    """`registry[name] = entry`, refusing an entry of another type or a name already taken."""
    if not isinstance(entry, entry_type):
        raise TypeError(f"register({name!r}, ...) takes a {entry_type.__name__}, got {type(entry).__name__}")
    if name in registry:
        raise ValueError(f"{kind} {name!r} is already registered")
    registry[name] = entry
