"""Checks of public arguments, made up front at the call that got them: each raises MemmgrInputError naming the call,
the argument, the value it got and what to pass instead, so that a bad value never fails later, far from the call,
as a bare TypeError, ValueError or OverflowError."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from memmgr.errors import MemmgrInputError

# Byte counts above this are not a size any host or GPU has (and overflow C integers further down).
MAX_BYTES = 1 << 62


def _bad(where: str, name: str, value: Any, want: str) -> MemmgrInputError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MemmgrInputError(f"{where}: {name} must be {want}, got {shown} ({type(value).__name__}); pass {want}")


def integer(where: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = MAX_BYTES,
            optional: bool = False) -> int | None:
    """``value`` as an int (bools and floats refused) within [minimum, maximum]; None passes when ``optional``."""
    if value is None and optional:
        return None
    bound = f" >= {minimum}" if minimum is not None else ""
    want = f"an int{bound}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _bad(where, name, value, want)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _bad(where, name, value, f"an int{bound}" + (f" and <= {maximum}" if maximum is not None else ""))
    return value


def number(where: str, name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
           maximum: float | None = None, optional: bool = False) -> float | None:
    """``value`` as a finite float (bools refused), > 0 if ``positive``, within [minimum, maximum]."""
    if value is None and optional:
        return None
    bounds = ([">= %g" % minimum] if minimum is not None else []) + (["> 0"] if positive else []) + \
        (["<= %g" % maximum] if maximum is not None else [])
    want = "a finite number" + (" " + " and ".join(bounds) if bounds else "") + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(where, name, value, want)
    got = float(value)
    if not math.isfinite(got) or (positive and got <= 0) or (minimum is not None and got < minimum) or \
            (maximum is not None and got > maximum):
        raise _bad(where, name, value, want)
    return got


def boolean(where: str, name: str, value: Any, *, optional: bool = False) -> bool | None:
    """``value`` if it is a bool (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise _bad(where, name, value, "True or False" + (" or None" if optional else ""))
    return value


def string(where: str, name: str, value: Any, *, optional: bool = False) -> str | None:
    """``value`` if it is a non-empty str (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(where, name, value, "a non-empty str" + (" or None" if optional else ""))
    return value


def function(where: str, name: str, value: Any, *, optional: bool = False) -> Callable[..., Any] | None:
    """``value`` if it is callable (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not callable(value):
        raise _bad(where, name, value, "a callable" + (" or None" if optional else ""))
    return value


def instance(where: str, name: str, value: Any, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """``value`` if it is an instance of ``kind`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _bad(where, name, value, f"a {names}" + (" or None" if optional else ""))
    return value


def names(where: str, name: str, values: Any) -> tuple[str, ...]:
    """Group names: each a str."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _bad(where, name, values, "a list or tuple of group names (str)")
    values = list(values)
    for value in values:
        if not isinstance(value, str):
            raise _bad(where, name, value, "group names (str)")
    return tuple(values)


def sequence_of(where: str, name: str, values: Any, kind: type | tuple[type, ...] | Callable[[Any], bool],
                what: str) -> list[Any]:
    """``values`` as a list whose every item is an instance of ``kind`` (or, for a function, one it accepts;
    ``what`` names such an item)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _bad(where, name, values, f"a list of {what}")
    values = list(values)
    accepts = kind if callable(kind) and not isinstance(kind, type) else (lambda value: isinstance(value, kind))
    for value in values:
        if not accepts(value):
            raise _bad(where, f"each item of {name}", value, what)
    return values


def named_tensors(where: str, name: str, values: Any, *, list_pairs: bool = True
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """``values`` (an iterable of ``(name, tensor)`` pairs, or a mapping) as pairs: whether it is iterable is checked
    now, each item as it comes (the stream may be lazy). ``list_pairs`` also takes ``[name, tensor]`` lists."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Iterable):
        raise _bad(where, name, values, "an iterable of (name, tensor) pairs, e.g. model.named_parameters() or "
                                        "dict.items()")
    items = values.items() if isinstance(values, Mapping) else values
    kinds = (tuple, list) if list_pairs else tuple

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for item in items:
            if not (isinstance(item, kinds) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise _bad(where, f"each item of {name}", item, "a (name, tensor) pair")
            yield item[0], item[1]
    return checked()


def device(where: str, name: str, value: Any, *, optional: bool = False) -> torch.device | None:
    """``value`` (a torch.device, a device string such as ``"cuda:0"``, or a CUDA index) as a torch.device; None
    passes when ``optional``."""
    if value is None and optional:
        return None
    want = "a torch.device, a device string such as 'cuda:0' or 'cpu', or a CUDA device index" + \
        (" or None" if optional else "")
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise _bad(where, name, value, want)
    if isinstance(value, numbers.Integral) and value < 0:
        raise _bad(where, name, value, want)
    try:
        return torch.device("cuda", int(value)) if isinstance(value, numbers.Integral) else torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise _bad(where, name, value, want) from None
