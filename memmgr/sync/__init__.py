"""Weight sync: trainer weights handed to inference engines.

Today's package holds memmgr's reference protocol, a bucketed broadcast from one trainer rank to the engine processes
of its sync group (NCCL on GPUs, gloo on the CPU):

1. the sender broadcasts a small header; the layout (names, shapes, dtypes, bucket offsets) follows only when the
   receivers have not seen this version yet, so steady-state syncs send no metadata;
2. every rank reports its status in one all-reduce, so a disagreement (a tensor the engine lacks or holds in another
   shape or dtype) raises a clear error on every side before any weight moves;
3. the weights travel as flat per-dtype buckets of bounded size, one broadcast per bucket; each receiver holds at
   most two buckets and hands ``(engine_name, view)`` pairs to ``load_weights`` after mapping names with
   ``name_map``;
4. a last all-reduce reports whether every receiver loaded everything.

Modules: ``protocol`` (wire constants), ``layout`` (specs, buckets, versions), ``comm`` (process groups and
collectives), ``names`` (name maps), ``endpoint`` (status exchange, device handshake), ``sender``, ``receiver``,
``loaders`` (``load_weights`` for plain torch modules).
"""
from memmgr.errors import MemmgrSyncError
from memmgr.sync.comm import SyncGroup, device_uuid, init_sync_group
from memmgr.sync.layout import BucketSpec, SyncLayout, SyncStats, TensorSpec
from memmgr.sync.loaders import ModuleWeightLoader, module_load_weights
from memmgr.sync.protocol import PROTOCOL_VERSION, SAME_GPU_HINT
from memmgr.sync.receiver import WeightReceiver
from memmgr.sync.sender import WeightSender

__all__ = ["WeightSender", "WeightReceiver", "SyncGroup", "init_sync_group", "SyncLayout", "SyncStats", "TensorSpec",
           "BucketSpec", "ModuleWeightLoader", "module_load_weights", "MemmgrSyncError", "device_uuid",
           "SAME_GPU_HINT", "PROTOCOL_VERSION"]
