"""Megatron-core -> Hugging Face weight export, streamed in bounded flat buckets across TP, PP, VPP and EP.

``MegatronExporter(model_chunks, hf_config, weights=..., bucket_bytes=..., receivers=...)`` plans the export on
every rank (one gather of parameter metadata, checked against the Hugging Face config); ``.buckets()`` streams
``ExportBucket`` objects (one flat tensor per dtype plus ``entries``) to the receiver ranks. Families with a table:
Llama (and Mistral), Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Mixtral. Modules: ``families``
(one name table per model family), ``layouts`` (fused-layout splits and tensor-parallel re-joins), ``discovery``
(this rank's parameters under global names), ``plan`` (gathered plan, checks, bucket packing), ``sources`` (device
or memmgr host copy), ``exporter`` (the collective stream), ``groups`` (the stream one decoder layer at a
time).
"""
from memmgr.sync.export.errors import MemmgrExportError
from memmgr.sync.export.exporter import DEFAULT_BUCKET_BYTES, ExportBucket, MegatronExporter, export_buckets
from memmgr.sync.export.families import FAMILIES, Family, Row, family_for
from memmgr.sync.export.groups import grouped_tensors, layer_groups
from memmgr.sync.export.plan import ExportEntry
from memmgr.sync.export.sources import DeviceSource, HostCopySource, WeightSource

__all__ = ["MegatronExporter", "ExportBucket", "ExportEntry", "export_buckets", "MemmgrExportError",
           "DEFAULT_BUCKET_BYTES", "FAMILIES", "Family", "Row", "family_for", "DeviceSource", "HostCopySource",
           "WeightSource", "layer_groups", "grouped_tensors"]
