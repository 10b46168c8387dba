"""The forms a sync's weights come in, each turned into a vLLM ``WeightSource`` (the one thing every trainer-side
weight-transfer engine consumes).

``as_weight_source`` takes a vLLM ``WeightSource`` (used as it is), a ``MegatronExporter`` (``ExportWeightSource``),
a dict or list of ``(name, tensor)``, a list of ``WeightBucket`` s or of the Megatron export's buckets (one flat
tensor per dtype), or a one-pass iterator of any of these together with ``specs`` (a one-pass stream cannot be
inspected before it moves). Lists and dicts give their specs themselves when ``specs`` is None. A source built
from a one-pass iterator can be iterated once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from memmgr.errors import MemmgrInputError, MemmgrStateError
from memmgr.sync.engines.vllm.source import ExportWeightSource
from memmgr.sync.transports.base import (
    ParamSpec,
    WeightBucket,
    as_specs,
    is_multi_dtype_bucket,
    specs_of,
    split_per_dtype,
)

Weights = Any  # WeightSource | MegatronExporter | Mapping[str, Tensor] | Sequence[(name, Tensor)] | buckets | iterator


class SpecsSource(WeightSource):
    """A ``WeightSource`` whose ``metadata()`` is ``specs`` and whose iteration is ``make_pairs()``, in the order the
    caller gave (``iter_groups`` batches one pair at a time); ``one_pass``: it can be iterated once (a stream given as
    an iterator)."""

    def __init__(self, specs: Sequence[ParamSpec], make_pairs: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 *, one_pass: bool = False) -> None:
        self.specs = list(specs)
        self._make_pairs = make_pairs
        self._one_pass = one_pass
        self._passes = 0

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(s.name, s.dtype, tuple(s.shape)) for s in self.specs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._one_pass and self._passes:
            raise MemmgrStateError("vLLM weight sync: this weight source was built from a one-pass iterator and was "
                                   "already sent; pass a fresh iterator (or a list, dict or exporter) per sync")
        self._passes += 1
        return iter(self._make_pairs())

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """The pairs in the order given, one per batch: a stream given by the caller need not follow the layer
        partition of its specs (the engine that sends it checks every tensor against them)."""
        for name, tensor in self:
            yield [name], [tensor]


def _bucket_pairs(buckets: Iterable[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for b in buckets:
        for part in (split_per_dtype(b) if is_multi_dtype_bucket(b) else [b]):
            yield from part.views()


def _is_bucket(obj: Any) -> bool:
    return isinstance(obj, WeightBucket) or is_multi_dtype_bucket(obj)


def _is_exporter(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("entries", "buckets", "is_receiver")) and callable(obj.buckets)


def as_weight_source(weights: Weights, specs: Sequence[Any] | None = None) -> WeightSource:
    """A vLLM ``WeightSource`` over ``weights`` (see the module docstring); ``specs``: what a one-pass stream will
    yield (``ParamSpec`` s, the export's entries, vLLM's ``ParamMeta``: anything with name, shape and dtype)."""
    if isinstance(weights, WeightSource) or _is_exporter(weights):
        if specs is not None:
            raise MemmgrInputError(f"VLLMWeightSync.sync: a {type(weights).__name__} declares its own metadata; "
                                   f"drop specs=")
        return weights if isinstance(weights, WeightSource) else ExportWeightSource(weights)
    checked = as_specs(specs) if specs is not None else None
    if isinstance(weights, Mapping):
        items = list(weights.items())
        return SpecsSource(checked if checked is not None else specs_of(items), lambda: items)
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        listed = list(weights)
        if listed and all(_is_bucket(w) for w in listed):
            if checked is None:
                checked = specs_of(list(_bucket_pairs(listed)))  # reads shapes and dtypes of the views
            return SpecsSource(checked, lambda: _bucket_pairs(listed))
        return SpecsSource(checked if checked is not None else specs_of(listed), lambda: listed)
    if checked is None:
        raise MemmgrInputError("VLLMWeightSync.sync: the weights are a one-pass iterator, so their names, shapes and "
                               "dtypes cannot be checked before they move; pass specs= (the export's entries, or a "
                               "ParamSpec per tensor) or a list/dict of tensors or buckets")
    if not isinstance(weights, Iterable):
        raise MemmgrInputError(f"VLLMWeightSync.sync: weights must be a WeightSource, a MegatronExporter, a dict or "
                               f"list of (name, tensor), a list of buckets or an iterator of either; got "
                               f"{type(weights).__name__}")
    it = iter(weights)
    first = next(it, None)

    def chain() -> Iterator[Any]:
        if first is not None:
            yield first
            yield from it

    if first is not None and _is_bucket(first):
        return SpecsSource(checked, lambda: _bucket_pairs(chain()), one_pass=True)
    return SpecsSource(checked, chain, one_pass=True)


__all__ = ["Weights", "SpecsSource", "as_weight_source"]
