"""Transports of the weight sync: each moves a stream of flat per-dtype ``WeightBucket`` s from the trainer to an
engine. ``base`` defines the bucket and its packer, the pre-flight check and the ``Transport`` interface; ``inproc``
hands buckets to a ``load_weights`` callable in the same process; ``gloo`` and ``nccl`` broadcast them over a group of
their own (``collective``: CPU engines and tests; an engine on another GPU); ``ipc`` passes them through a ring of CUDA
IPC buffers to an engine on the same GPU (import it where CUDA is).
"""
from memmgr.errors import MemmgrSyncMismatchError, MemmgrSyncTimeoutError
from memmgr.sync.transports.base import (
                                         ALIGN_BYTES,
                                         DEFAULT_BUCKET_BYTES,
                                         ParamSpec,
                                         TensorEntry,
                                         Transport,
                                         WeightBucket,
                                         as_specs,
                                         bucketize,
                                         check_specs,
                                         group_pairs,
                                         specs_of,
                                         split_per_dtype,
)
from memmgr.sync.transports.inproc import InProcessTransport

__all__ = ["ALIGN_BYTES", "DEFAULT_BUCKET_BYTES", "MemmgrSyncMismatchError", "MemmgrSyncTimeoutError", "ParamSpec",
           "TensorEntry", "Transport", "WeightBucket", "as_specs", "bucketize", "group_pairs",
           "split_per_dtype", "check_specs",
           "specs_of", "InProcessTransport"]
