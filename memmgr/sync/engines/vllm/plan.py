"""The forms a sync's weights come in, turned into the specs to check and the bucket stream to send.

``plan_buckets`` takes a dict or list of ``(name, tensor)`` (bucketized on the host), a list of ``WeightBucket`` s
or of the Megatron export's buckets (one flat tensor per dtype, split per dtype), or a one-pass iterator of any of
these together with ``specs`` (a one-pass stream cannot be inspected before it moves). Lists and dicts give their
specs themselves when ``specs`` is None.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from memmgr.errors import MemmgrInputError
from memmgr.sync.transports.base import (
    ParamSpec,
    WeightBucket,
    as_specs,
    bucketize,
    is_multi_dtype_bucket,
    specs_of,
    split_per_dtype,
)


Weights = Any  # Mapping[str, Tensor] | Sequence[(name, Tensor)] | Sequence[WeightBucket] | Iterable of either


def plan_buckets(weights: Weights, specs: Sequence[Any] | None, bucket_bytes: int
                 ) -> tuple[list[ParamSpec], Iterator[WeightBucket]]:
    """The specs to check and the bucket stream to send, from whatever form the weights come in."""
    if specs is not None:
        specs = as_specs(specs)
    if isinstance(weights, Mapping):
        return (specs if specs is not None else specs_of(weights),
                bucketize(weights.items(), bucket_bytes, device="cpu"))
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if weights and all(isinstance(w, WeightBucket) or is_multi_dtype_bucket(w) for w in weights):
            buckets = [b for w in weights for b in (split_per_dtype(w) if is_multi_dtype_bucket(w) else [w])]
            return (specs if specs is not None else [s for b in buckets for s in b.specs()], iter(buckets))
        return (specs if specs is not None else specs_of(weights),
                bucketize(iter(weights), bucket_bytes, device="cpu"))
    if specs is None:
        raise MemmgrInputError("VLLMWeightSync.sync: the weights are a one-pass iterator, so their names, shapes and "
                               "dtypes cannot be checked before they move; pass specs= (the export's entries, or a "
                               "ParamSpec per tensor) or a list/dict of tensors or buckets")
    it = iter(weights)
    first = next(it, None)
    if first is None:
        return specs, iter(())

    def chain() -> Iterator[Any]:
        yield first
        yield from it

    if isinstance(first, WeightBucket) or is_multi_dtype_bucket(first):
        def flat() -> Iterator[WeightBucket]:
            for w in chain():
                yield from (split_per_dtype(w) if is_multi_dtype_bucket(w) else [w])

        return specs, flat()
    return specs, bucketize(chain(), bucket_bytes, device="cpu")


__all__ = ["Weights", "plan_buckets"]
