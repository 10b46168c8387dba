"""The megatron-core models of the benchmarks, the examples and the tests, built in one place.

- ``transformer_config``, ``gpt_model`` and ``ddp_and_optimizer``: a ``TransformerConfig`` (dropout 0), a
  ``GPTModel`` on megatron's local layer spec (norm, q/k norm and experts from the config), and megatron DDP with its
  Adam optimizer. ``LLAMA_LAYOUT`` holds the Llama layout's config fields (RMSNorm, SwiGLU, no linear biases).
- ``build_gpt``: the GPT of ``memmgr bench`` and the benchmarks (learned positions, LayerNorm) in DDP with
  grad_reduce_in_fp32 and megatron Adam. ``gpt_for_hf``: a dense GPT laid out like a Hugging Face Llama/Mistral/
  Qwen2/Qwen3 config, in DDP.
- ``FAMILIES``, ``hf_config``, ``megatron_config``, ``build_chunks``: tiny models (hidden 64) of several Hugging Face
  families (dense, MoE, tied or not) that match their transformers twin numerically, one chunk per virtual pipeline
  stage, and the sharding of a full (TP=1) megatron state dict into a parallel model's parameters
  (``load_full_state``); ``randomize`` draws weights far from megatron's init, the same model at any TP.
- ``megatron_on_cpu`` / ``single_rank_megatron``: megatron-core on the CPU through
  ``memmgr.tools.megatron_cpu_shim``. MoE layers use the ``allgather`` token dispatcher (the ``alltoall`` one creates
  a CUDA stream in its constructor), and ``moe_utils.te_general_gemm`` is set to None because megatron-core 0.16.1
  reads that name without TransformerEngine installed (a NameError in the router otherwise).

megatron-core and transformers are imported inside the functions; importing this module needs only torch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F

HF_VOCAB = 120       # the Hugging Face vocabulary
MEGATRON_VOCAB = 128  # megatron's padded vocabulary (rows 120..127 are padding the export drops)
SEQ = 8

# family -> (Hugging Face config kwargs, megatron TransformerConfig kwargs, GPTModel kwargs)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        hf=dict(model_type="llama", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16),
        tied=False),
    "qwen2": dict(
        hf=dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                add_qkv_bias=True),
        tied=True),
    "qwen3": dict(
        hf=dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                qk_layernorm=True),
        tied=True),
    "qwen3_moe": dict(
        hf=dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, decoder_sparse_step=1,
                mlp_only_layers=[]),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                qk_layernorm=True, num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2),
        tied=False),
    "qwen2_moe": dict(
        hf=dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, decoder_sparse_step=1,
                mlp_only_layers=[], qkv_bias=True),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                add_qkv_bias=True, num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
                moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True),
        tied=False),
    # one key/value head: with TP=2 each shard of linear_qkv holds half of the single query group
    "qwen2-mqa": dict(
        hf=dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=1, tie_word_embeddings=False),
        mc=dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=1, kv_channels=16,
                add_qkv_bias=True),
        tied=False),
    "mixtral": dict(
        hf=dict(model_type="mixtral", hidden_size=64, intermediate_size=32, num_local_experts=4,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                tie_word_embeddings=False),
        mc=dict(hidden_size=64, ffn_hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2),
        tied=False),
}
RMS_EPS = 1e-6
ROPE_THETA = 10000.0

# The Llama layout's TransformerConfig fields (Mistral, Qwen2/3 and the MoE families share them)
LLAMA_LAYOUT: dict[str, Any] = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                                    add_bias_linear=False)


def transformer_config(**fields: Any):
    """A megatron-core ``TransformerConfig`` of ``fields``, hidden and attention dropout 0 unless given."""
    from megatron.core.transformer import TransformerConfig

    fields.setdefault("hidden_dropout", 0.0)
    fields.setdefault("attention_dropout", 0.0)
    return TransformerConfig(**fields)


def gpt_model(cfg: Any, *, vocab_size: int, max_sequence_length: int, rope: bool = False, rotary_base: int = 10000,
              tied: bool = False, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
    """A ``GPTModel`` of ``cfg`` on megatron's local layer spec (the config's normalization, q/k layernorm and
    experts); RoPE positions where ``rope``, else learned absolute ones; the output layer tied to the embedding
    where ``tied``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, qk_layernorm=cfg.qk_layernorm,
                                    normalization=cfg.normalization)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=vocab_size,
                    max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=tied,
                    position_embedding_type="rope" if rope else "learned_absolute", rotary_base=rotary_base,
                    vp_stage=vp_stage)


def ddp_and_optimizer(cfg: Any, model: Any, *, lr: float | None = 1e-3, distributed_optimizer: bool = True,
                      grad_reduce_in_fp32: bool = True) -> tuple[Any, Any]:
    """``model`` (under ``Float16Module`` where ``cfg.bf16``) in megatron ``DistributedDataParallel``, and its megatron
    Adam optimizer (clip_grad 1.0; None where ``lr`` is None)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    if cfg.bf16:
        model = Float16Module(cfg, model)
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32,
                                           use_distributed_optimizer=distributed_optimizer), model)
    if lr is None:
        return ddp, None
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, bf16=cfg.bf16, params_dtype=cfg.params_dtype,
                                                 use_distributed_optimizer=distributed_optimizer, clip_grad=1.0),
                                 [ddp])
    return ddp, opt


def build_gpt(*, layers: int, hidden: int, heads: int, vocab: int, seq: int, ffn: int | None = None,
              bf16: bool = True, dist_opt: bool = True, cpu_init: bool = False, seed: int = 0, lr: float = 1e-4,
              grad_reduce_in_fp32: bool = True, device: Any = "cuda", **parallel: Any) -> tuple[Any, Any]:
    """A GPT (LayerNorm, learned positions, untied) built after ``torch.manual_seed(seed)``, in DDP with its megatron
    Adam optimizer. ``device``: "cuda" moves it with ``Module.cuda()`` (a no-op under ``megatron_cpu_shim``), None
    leaves it where it was built, anything else goes to ``Module.to``. ``parallel``: more TransformerConfig fields
    (TP/PP sizes) and GPTModel's ``pre_process``/``post_process``."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(seed)
    stages = {k: parallel.pop(k) for k in ("pre_process", "post_process") if k in parallel}
    extra = {"ffn_hidden_size": ffn} if ffn else {}
    cfg = transformer_config(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, bf16=bf16,
                             params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=cpu_init, **extra,
                             **parallel)
    model = gpt_model(cfg, vocab_size=vocab, max_sequence_length=seq, **stages)
    if device == "cuda":
        model.cuda()
    elif device is not None:
        model.to(device)
    return ddp_and_optimizer(cfg, model, lr=lr, distributed_optimizer=dist_opt,
                             grad_reduce_in_fp32=grad_reduce_in_fp32)


def _rope_theta(hf_cfg: Any) -> float:
    theta = getattr(hf_cfg, "rope_theta", None)  # transformers 4; transformers 5 keeps it in rope_parameters
    if theta is None:
        theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def gpt_for_hf(hf_cfg: Any, device: torch.device, *, max_seq: int = 128) -> Any:
    """A megatron-core GPTModel laid out like a dense Hugging Face model of the Llama (and Mistral), Qwen2 or Qwen3
    family, so that ``memmgr.sync.export.MegatronExporter`` exports it under that config's names and a transformers
    model loaded with the export computes what megatron computes: RMSNorm (the config's ``rms_norm_eps``), SwiGLU,
    RoPE (the config's theta), no linear biases (Qwen2: a qkv bias; Qwen3: per-head q/k RMSNorm), ``head_dim`` from
    the config (kv_channels), embeddings tied as the config says; local layer spec, bf16, in megatron DDP with the
    distributed optimizer's param buffers (what ``memmgr.for_megatron`` manages), no optimizer. Random megatron
    initialization, on the GPU for a CUDA ``device``, else on the CPU (under ``megatron_cpu_shim``). ``hf_cfg`` may
    be any object with the Hugging Face config attributes."""
    model_type = getattr(hf_cfg, "model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"gpt_for_hf builds dense llama/mistral/qwen2/qwen3 models, not {model_type!r}")
    hidden, heads = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    cfg = transformer_config(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=getattr(hf_cfg, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf_cfg, "head_dim", None) or hidden // heads, ffn_hidden_size=hf_cfg.intermediate_size,
        layernorm_epsilon=float(getattr(hf_cfg, "rms_norm_eps", 1e-6)), add_qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3", bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=device.type != "cuda", **LLAMA_LAYOUT)
    model = gpt_model(cfg, vocab_size=hf_cfg.vocab_size, max_sequence_length=max_seq, rope=True,
                      rotary_base=int(_rope_theta(hf_cfg)), tied=bool(getattr(hf_cfg, "tie_word_embeddings", False)))
    if device.type == "cuda":
        model.cuda()
    return ddp_and_optimizer(cfg, model, lr=None, grad_reduce_in_fp32=False)[0]


def hf_config(family: str, num_layers: int = 2):
    """The Hugging Face config of ``family`` (vocabulary ``HF_VOCAB``)."""
    from transformers import AutoConfig

    kwargs = dict(FAMILIES[family]["hf"])
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=HF_VOCAB, num_hidden_layers=num_layers,
                                rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, max_position_embeddings=64,
                                attention_dropout=0.0, **kwargs)


def megatron_config(family: str, num_layers: int = 2, **parallel: Any):
    """The fp32, CPU-initialized TransformerConfig of ``family`` (MoE: allgather dispatcher, no aux loss)."""
    mc = dict(FAMILIES[family]["mc"])
    if "num_moe_experts" in mc:
        mc.update(moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                  moe_aux_loss_coeff=0.0)
    return transformer_config(num_layers=num_layers, use_cpu_initialization=True, layernorm_epsilon=RMS_EPS,
                              params_dtype=torch.float32, **LLAMA_LAYOUT, **mc, **parallel)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    from memmgr.tools.megatron_cpu_shim import cpu_megatron

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    with cpu_megatron():
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        yield


@contextlib.contextmanager
def single_rank_megatron(init_dir) -> Iterator[None]:
    """megatron-core on the CPU in this process: a one-rank gloo world (rendezvous in ``init_dir``) and
    ``parallel_state`` at TP=PP=1, torn down on exit."""
    with megatron_on_cpu():
        from megatron.core import parallel_state

        torch.distributed.init_process_group("gloo", init_method=f"file://{init_dir}/init", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def build_chunks(family: str, num_layers: int = 2, vpp: int | None = None, **parallel: Any) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage) for the current parallel_state."""
    from megatron.core import parallel_state as ps

    if vpp:
        parallel["virtual_pipeline_model_parallel_size"] = vpp
    cfg = megatron_config(family, num_layers, **parallel)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(gpt_model(
            cfg, vocab_size=MEGATRON_VOCAB, max_sequence_length=64, rope=True, rotary_base=int(ROPE_THETA),
            tied=FAMILIES[family]["tied"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage), vp_stage=stage))
    return chunks


def randomize(chunks: list, seed: int = 0) -> None:
    """Weights far from megatron's init (norms around 1, routers decisive) so that a wrong mapping shows. Under
    tensor parallelism each rank draws the whole (TP=1) tensor and keeps its shard, so the ranks hold one model (at
    TP=1 the same draws as ever)."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                rank, size = 0, 1
                if getattr(p, "tensor_model_parallel", False) and ps.model_parallel_is_initialized():
                    expert = ".mlp.experts." in name
                    rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
                    size = (ps.get_expert_tensor_parallel_world_size() if expert
                            else ps.get_tensor_model_parallel_world_size())
                shape = list(p.shape)
                if size > 1:
                    shape[p.partition_dim] *= size
                noise = torch.randn(shape, generator=g)
                if "norm" in name:
                    full = 1.0 + 0.2 * noise
                elif "router" in name:
                    full = 0.5 * noise
                else:
                    full = 0.08 * noise
                p.copy_(shard_from_full(full, p, name, rank, size))


def global_name(chunk, local_name: str) -> str:
    """The TP=1 name of a parameter of a parallel model: layer numbers from megatron's own ``layer_number``, experts
    from the MoE layer's ``local_expert_indices``."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        layer = chunk.decoder.layers[int(parts[2])]
        parts[2] = str(layer.layer_number - 1)
        if parts[3:6] == ["mlp", "experts", "local_experts"]:
            parts[6] = str(layer.mlp.local_expert_indices[int(parts[6])])
    return ".".join(parts)


def shard_from_full(full: torch.Tensor, param: torch.nn.Parameter, local_name: str, rank: int,
                    size: int) -> torch.Tensor:
    """This rank's piece of a TP=1 tensor: megatron's column/row split; a gated fc1 splits gate and up each."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if local_name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def load_full_state(chunks: list, full: dict[str, torch.Tensor]) -> None:
    """Fills this rank's parameters from a TP=1 state dict (global names)."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        for chunk in chunks:
            for local_name, p in chunk.named_parameters():
                expert = ".mlp.experts." in local_name
                rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
                size = (ps.get_expert_tensor_parallel_world_size() if expert
                        else ps.get_tensor_model_parallel_world_size())
                name = global_name(chunk, local_name)
                if name == "output_layer.weight" and name not in full:  # tied: the last stage's copy
                    name = "embedding.word_embeddings.weight"
                p.copy_(shard_from_full(full[name], p, local_name, rank, size))


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model``'s logits on ``tokens`` over the Hugging Face vocabulary (the padding rows dropped), fp32."""
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)[..., :HF_VOCAB].float()


def greedy(step, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens after ``tokens`` (``step`` maps a [1, s] token tensor to [1, s, vocab] logits)."""
    out = tokens
    for _ in range(n):
        nxt = step(out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[:, tokens.shape[1]:]


def save_hf_checkpoint(path, hf_cfg, tensors: dict[str, torch.Tensor]) -> None:
    """A local Hugging Face checkpoint directory (config.json + model.safetensors) of exported tensors."""
    from safetensors.torch import save_file

    hf_cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
