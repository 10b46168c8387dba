"""Weight sync: trainer weights handed to inference engines.

- ``export``: megatron-core chunks to Hugging Face names and layouts, re-joined across TP/PP/EP, streamed in flat
  per-dtype buckets from device memory or the pinned host copy (``MegatronExporter``).
- ``transports``: the bucket stream's data planes (in-process, gloo, NCCL, same-GPU CUDA IPC) behind ``Transport``.
- ``engines``: engine adapters (``engines.vllm.VLLMWeightSync``: vLLM's weight-transfer protocol).
- ``session``: ``sync_weights``, one sync as one call with the manager's before/after-sync hooks.
- The reference protocol (``WeightSender``/``WeightReceiver``: ``protocol``, ``layout``, ``comm``, ``names``,
  ``endpoint``, ``sender``, ``receiver``): a bucketed broadcast of name -> tensor maps from one trainer rank to the
  engine processes of its group, with the layout sent only when it changed and a status all-reduce before any
  weight moves; ``loaders`` gives ``load_weights`` for engines that are plain torch modules.
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
