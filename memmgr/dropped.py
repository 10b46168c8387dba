"""What happens to a bucket that is garbage collected without ``unmanage()`` (a manager nobody closed).

``FlatTensors`` registers ``release_dropped_bucket`` as its finalizer, with the cells it shares with it (host store,
events of the copy in flight, state) rather than the bucket itself: an offloaded or discarded bucket's tensors get
their memory back, and its host store goes back to the pool once no copy reads or writes it.
"""
from __future__ import annotations

import logging

import torch

from memmgr.host_memory import HostBuffer, HostMemoryPool
from memmgr.states import BucketState

logger = logging.getLogger("memmgr")


def release_dropped_bucket(pool: HostMemoryPool, host: list[HostBuffer | None], name: str, inflight: list[list],
                            flat: torch.Tensor, state: list[BucketState], keep_alive: object = None) -> None:
    """Runs when a bucket is garbage collected without unmanage() (a manager nobody closed): its host store must not
    stay in use forever, must not be handed out again while a copy of the dropped bucket still reads or writes it,
    and must not take the only copy of the contents with it: an offloaded (or discarded) bucket's tensors get their
    memory back first, as close() would have left them. ``keep_alive`` (a same-address bucket's
    ``SameAddressStorage``) holds what restoring the memory needs until then."""
    for event in inflight[0]:
        event.synchronize()
    buffer = host[0]
    offloaded = state[0] in (BucketState.ON_HOST, BucketState.OFFLOADING)
    if offloaded or state[0] is BucketState.DISCARDED:
        try:
            restore_dropped(buffer if offloaded else None, flat)
        except Exception as exc:  # noqa: BLE001 - a finalizer must not raise; keep the only copy rather than lose it
            logger.error("bucket %s was dropped without close() while %s, and its memory could not be given back on "
                         "%s (%s: %s); its host buffer is kept out of the pool. Close managers before dropping them",
                         name, state[0].value, flat.device, type(exc).__name__, exc)
            return
        logger.warning("bucket %s was dropped without close() while %s; its tensors got their memory back on %s "
                       "(close() the manager to do this at a time of your choosing)", name, state[0].value,
                       flat.device)
    if buffer is not None:
        pool.release(buffer)
        logger.debug("bucket %s was dropped without close(); its host buffer went back to the pool", name)


def restore_dropped(buffer: HostBuffer | None, flat: torch.Tensor) -> None:
    """Gives ``flat`` its memory back: the contents from ``buffer``, or zeros (a discarded bucket) without one."""
    nbytes = flat.numel() * flat.element_size()
    storage = flat.untyped_storage()
    if storage.nbytes() != nbytes:
        storage.resize_(nbytes)
    with torch.no_grad():
        if buffer is None:
            flat.zero_()
        else:
            flat.view(torch.uint8).copy_(buffer.tensor[:nbytes])
    if flat.is_cuda:
        torch.cuda.synchronize(flat.device)
