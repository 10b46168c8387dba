"""Megatron -> Hugging Face export on a GPU (run by the lead on the GPU machine; skipped without CUDA): a bf16
Llama-shaped model in megatron DDP under for_megatron exports the same bytes from device memory and from the pinned
host copy of its offloaded weights, which stay offloaded, and the export's extra GPU memory stays within two buckets
plus the largest parameter."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def megatron_cuda(tmp_path_factory):
    from megatron.core import parallel_state, tensor_parallel

    if torch.distributed.is_initialized() or parallel_state.model_parallel_is_initialized():
        pytest.skip("another test left a process group or megatron's parallel state initialized")
    init_file = tmp_path_factory.mktemp("dist") / "init"
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_gpu_export_from_device_and_pinned_host_copy_agree_within_the_memory_bound(megatron_cuda):
    from transformers import LlamaConfig

    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron
    from memmgr.sync.export import MegatronExporter
    from memmgr.tools.megatron_models import LLAMA_LAYOUT, ddp_and_optimizer, gpt_model, transformer_config

    cfg = transformer_config(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2,
                             ffn_hidden_size=1376, bf16=True, params_dtype=torch.bfloat16,
                             pipeline_dtype=torch.bfloat16, **LLAMA_LAYOUT)
    # megatron's vocabulary padded to 4096 rows; the export drops the rows past the Hugging Face config's 4000
    model = gpt_model(cfg, vocab_size=4096, max_sequence_length=128, rope=True).cuda()
    ddp, _ = ddp_and_optimizer(cfg, model, lr=None, grad_reduce_in_fp32=False)  # under Float16Module, no optimizer
    hf = LlamaConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=64, intermediate_size=1376, vocab_size=4000, tie_word_embeddings=False)
    pool = HostMemoryPool()
    mgr = for_megatron(ddp, None, pool=pool)
    bucket_bytes = 2 * 2**20
    try:
        weights = mgr.group("weights")

        def export() -> tuple[dict[str, torch.Tensor], int, int]:
            exporter = MegatronExporter([ddp], hf, weights=weights, bucket_bytes=bucket_bytes)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = {}
            for bucket in exporter.buckets():
                out.update({n: t.cpu() for n, t in bucket.named_tensors()})
            torch.cuda.synchronize()
            return out, torch.cuda.max_memory_allocated() - base, exporter.plan.largest_unit_bytes

        on_device, peak_device, largest = export()
        mgr.offload("weights")
        from_host, peak_host, _ = export()
        assert weights.device_bytes == 0
        assert list(on_device) == list(from_host)
        for name in on_device:
            assert torch.equal(on_device[name].view(torch.uint8), from_host[name].view(torch.uint8)), name
        bound = 2 * bucket_bytes + largest
        assert peak_device <= bound and peak_host <= bound, (peak_device, peak_host, bound)
    finally:
        mgr.close()
        pool.trim()
