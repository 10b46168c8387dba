"""Hooks: user functions a manager calls around its offloads, onloads and weight syncs.

A ``Hooks`` registry holds ``(event, fn)`` entries in registration order. ``fire`` calls the hooks of one event and
stops at the first error; ``fire_all`` calls every hook of the event even when one raises (hooks that put a state
back, such as an engine's KV cache after a weight sync), then raises the first error with the others noted on it.
"""
from __future__ import annotations

import enum
import inspect
from typing import Any, Callable

from memmgr import arguments
from memmgr.errors import MemmgrInputError


class HookEvent(str, enum.Enum):
    BEFORE_OFFLOAD = "before_offload"
    AFTER_OFFLOAD = "after_offload"
    BEFORE_ONLOAD = "before_onload"
    AFTER_ONLOAD = "after_onload"
    BEFORE_WEIGHT_SYNC = "before_weight_sync"
    AFTER_WEIGHT_SYNC = "after_weight_sync"


HookFn = Callable[[str, tuple], Any]


class HookHandle:
    """Returned by register_hook; ``remove()`` unregisters the hook."""

    def __init__(self, hooks: list, entry: tuple):
        self._hooks = hooks
        self._entry = entry

    def remove(self) -> None:
        if self._entry in self._hooks:
            self._hooks.remove(self._entry)


class Hooks:
    """The hooks of one manager, in registration order: ``register`` adds one, ``fire``/``fire_all`` call them."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, HookFn]] = []

    def register(self, event: HookEvent | str, fn: HookFn) -> HookHandle:
        """Calls ``fn(event, group_names)`` at ``event``; MemmgrInputError for an unknown event or a ``fn`` that
        cannot be called with those two arguments."""
        try:
            event = HookEvent(event)
        except (ValueError, TypeError):
            raise MemmgrInputError(f"unknown hook event {event!r}; events: {[e.value for e in HookEvent]}") from None
        arguments.function(f"register_hook({event.value!r})", "fn", fn)
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: called as documented, unchecked
            signature = None
        if signature is not None:
            try:
                signature.bind(event.value, ())
            except TypeError:
                raise MemmgrInputError(f"register_hook({event.value!r}): fn{signature} cannot be called as "
                                       f"fn(event, group_names); give it those two parameters") from None
        entry = (event.value, fn)
        self._entries.append(entry)
        return HookHandle(self._entries, entry)

    def fire(self, event: HookEvent, names: tuple) -> None:
        """Calls every hook of ``event`` in registration order; the first error propagates at once."""
        for hook_event, fn in list(self._entries):
            if hook_event == event.value:
                fn(event.value, names)

    def fire_all(self, event: HookEvent, names: tuple) -> None:
        """Runs every hook of ``event`` even if one raises (hooks that restore a state), then raises the first
        error, with the others noted on it."""
        errors: list[Exception] = []
        for hook_event, fn in list(self._entries):
            if hook_event == event.value:
                try:
                    fn(event.value, names)
                except Exception as exc:  # noqa: BLE001 - the remaining hooks still run
                    errors.append(exc)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"memmgr: another {event.value} hook failed too: {other!r}")
            raise errors[0]

    def __len__(self) -> int:
        return len(self._entries)
