"""Trainer-name to engine-name mapping for the reference protocol (``name_map``)."""
from __future__ import annotations

from typing import Callable, Mapping, Union

NameMap = Union[Callable[[str], Union[str, None]], Mapping[str, str], None]



def describe_name_map(name_map: NameMap) -> str:
    if name_map is None:
        return "identity (no name_map)"
    if isinstance(name_map, Mapping):
        return f"a dict of {len(name_map)} entries"
    return getattr(name_map, "__qualname__", None) or getattr(name_map, "__name__", None) or repr(name_map)


def map_name(name_map: NameMap, name: str) -> str | None:
    if name_map is None:
        return name
    if isinstance(name_map, Mapping):
        return name_map.get(name, name)
    return name_map(name)
