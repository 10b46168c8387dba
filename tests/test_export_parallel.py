"""Megatron -> Hugging Face export across tensor, pipeline (with virtual stages) and expert parallelism: several
gloo processes, each holding its shard of one TP=1 model's weights, export tensors identical to the TP=1 export.

The parallel models are filled from the TP=1 model's state dict by megatron's own split (columns / rows, a gated
fc1 split per half; layers by megatron's ``layer_number``, experts by ``local_expert_indices``); for TP=2 the
parallel model's logits are checked against the TP=1 logits too, so the sharding itself is checked independently of
the export. The 4-process cases are marked slow (15-30 s each on two cores); the 2-process ones cover TP=2, PP=2
(with virtual stages) and EP=2 on their own.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from memmgr.tools.megatron_models import (HF_VOCAB, SEQ, build_chunks, hf_config, load_full_state,  # noqa: E402
                           megatron_logits, megatron_on_cpu, randomize)
from memmgr.sync.export import MegatronExporter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
pytestmark = [pytestmark, pytest.mark.integration]  # issue 31: tests by cost (tests/conftest.py)

# name: (family, layers, world, parallel sizes, virtual stages, receivers, check logits); a "+host" case wraps the
# chunks in megatron DDP under for_megatron and exports from the offloaded weights' host copy; a "+group" case exports
# each data-parallel replica on its own tensor-parallel group (MegatronExporter(group=...), receivers are ranks of that
# group), nothing on the default group: both replicas' group rank 0 (global ranks 0 and 2) receive the whole model
CASES = {
    "tp2": ("qwen2", 2, 2, dict(tp=2), None, (0, 1), True),
    "tp2-mqa": ("qwen2-mqa", 2, 2, dict(tp=2), None, (0,), True),  # more TP shards than query groups
    "pp2-vpp2": ("qwen3", 4, 2, dict(pp=2), 2, (0,), False),  # tied: the last stage's output layer is dropped
    "ep2+host": ("qwen3_moe", 2, 2, dict(ep=2), None, (1,), False),
    "tp2-pp2-ep2": ("qwen2_moe", 2, 4, dict(tp=2, pp=2, ep=2, etp=1), None, (0,), False),
    # experts split over an expert-TP group of 2 as well; dense weights replicated over 2 data-parallel ranks
    "tp2-dp2-ep2-etp2": ("qwen3_moe", 2, 4, dict(tp=2, ep=2, etp=2), None, (0, 3), False),
    "tp2-dp2+group": ("qwen2", 2, 4, dict(tp=2), None, (0,), False),
}


def global_receivers(case: str) -> tuple[int, ...]:
    """The global ranks that receive the export of ``case``."""
    receivers = CASES[case][5]
    return (0, 2) if case.endswith("+group") else receivers


@pytest.fixture(scope="module")
def megatron_env(tmp_path_factory):
    with megatron_on_cpu():
        from megatron.core import parallel_state

        init_file = tmp_path_factory.mktemp("dist") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _export(chunks, family: str, layers: int, **kwargs) -> dict[str, torch.Tensor]:
    exporter = MegatronExporter(chunks, hf_config(family, layers), bucket_bytes=24 * 1024, **kwargs)
    return {n: t.clone() for bucket in exporter.buckets() for n, t in bucket.named_tensors()}


def _worker(rank: int, world: int, case: str, workdir: str) -> None:
    family, layers, _world, sizes, vpp, receivers, check_logits = CASES[case]
    torch.set_num_threads(1)
    with megatron_on_cpu():
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world)
        tp, pp, ep, etp = sizes.get("tp", 1), sizes.get("pp", 1), sizes.get("ep", 1), sizes.get("etp")
        ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        try:
            parallel = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            expert_model_parallel_size=ep, pipeline_dtype=torch.float32)
            if etp is not None:
                parallel["expert_tensor_parallel_size"] = etp
            chunks = build_chunks(family, layers, vpp=vpp, **parallel)
            ref = torch.load(f"{workdir}/reference.pt")
            load_full_state(chunks, ref["megatron"])
            if case.endswith("+host"):
                got = _export_offloaded(chunks, family, layers, receivers)
            elif case.endswith("+group"):
                got = _export(chunks, family, layers, receivers=receivers, group=ps.get_tensor_model_parallel_group())
            else:
                got = _export(chunks, family, layers, receivers=receivers)
            assert bool(got) == (rank in global_receivers(case))
            if got:
                torch.save(got, f"{workdir}/export{rank}.pt")
            if check_logits:
                chunks[0].eval()
                logits = gather_from_tensor_model_parallel_region(
                    megatron_logits_full(chunks[0], ref["tokens"]))[..., :HF_VOCAB]
                if rank == 0:
                    torch.save(logits, f"{workdir}/logits.pt")
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()


def _export_offloaded(chunks, family: str, layers: int, receivers) -> dict[str, torch.Tensor]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron

    ddps = [DistributedDataParallel(c.config, DistributedDataParallelConfig(use_distributed_optimizer=True), c)
            for c in chunks]
    pool = HostMemoryPool()
    mgr = for_megatron(ddps, None, pool=pool)
    try:
        mgr.offload("weights")
        weights = mgr.group("weights")
        got = _export(ddps, family, layers, receivers=receivers, weights=weights)
        assert weights.device_bytes == 0
        return got
    finally:
        mgr.close()
        pool.trim()


def megatron_logits_full(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)


def _spawn(worker, args: tuple, nprocs: int) -> None:
    """Runs ``worker(rank, *args)`` in ``nprocs`` processes, one OpenMP thread each (two cores in CI)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.multiprocessing.spawn(worker, args=args, nprocs=nprocs, join=True)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if CASES[c][2] > 2 else c for c in CASES])
def test_parallel_export_equals_the_tp1_export(megatron_env, case, tmp_path):
    family, layers, world, _sizes, _vpp, receivers, check_logits = CASES[case]
    torch.manual_seed(0)
    chunks = build_chunks(family, layers)
    randomize(chunks, seed=3)
    chunks[0].eval()
    tokens = torch.randint(0, HF_VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(4))
    reference = _export(chunks, family, layers)
    torch.save({"megatron": {n: p.detach().clone() for n, p in chunks[0].named_parameters()}, "tokens": tokens},
               tmp_path / "reference.pt")
    _spawn(_worker, (world, case, str(tmp_path)), world)
    for rank in global_receivers(case):
        got = torch.load(tmp_path / f"export{rank}.pt")
        assert list(got) == list(reference)
        for name in reference:
            assert torch.equal(got[name], reference[name]), f"{case}: {name} differs on rank {rank}"
    if check_logits:
        logits = torch.load(tmp_path / "logits.pt")
        assert (logits - megatron_logits(chunks[0], tokens)).abs().max().item() <= 1e-5


def _failing_sync_worker(rank: int, world: int, path: str, workdir: str) -> None:
    """TP=2, receivers (0,): rank 0's transport fails at its second bucket; rank 1 only takes part in the export.
    Each rank writes what its call ended with."""
    import datetime

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from memmgr.errors import MemmgrSyncError
    from memmgr.host_memory import HostMemoryPool
    from memmgr.integrations.megatron import for_megatron
    from memmgr.sync import ModuleWeightLoader, send_weight_source, sync_weights
    from memmgr.sync.engines.vllm.source import ExportWeightSource
    from memmgr.sync.transports import InProcessTransport

    class FailingAt(InProcessTransport):
        def __init__(self, at: int):
            super().__init__(ModuleWeightLoader(torch.nn.Module()))
            self.held, self.at, self.sent = None, at, 0

        def send_bucket(self, bucket):
            self.sent += 1
            if self.sent == self.at:
                raise MemmgrSyncError("the engine went away")

    torch.set_num_threads(1)
    with megatron_on_cpu():
        from megatron.core import parallel_state as ps

        # a rank left waiting in the export's collectives fails after this, not after gloo's 30 minutes
        dist.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        ps.initialize_model_parallel(2, 1)
        try:
            chunks = build_chunks("qwen2", 2, tensor_model_parallel_size=2, pipeline_dtype=torch.float32)
            ddps = [DistributedDataParallel(c.config, DistributedDataParallelConfig(use_distributed_optimizer=True), c)
                    for c in chunks]
            pool = HostMemoryPool()
            mgr = for_megatron(ddps, None, pool=pool)
            exporter = MegatronExporter(ddps, hf_config("qwen2", 2), bucket_bytes=24 * 1024, receivers=(0,))
            try:
                for attempt in range(2):  # the ranks can sync again after the failure
                    try:
                        if path == "source":  # 1 KiB buckets: every layer group is sent as it arrives
                            send_weight_source(ExportWeightSource(exporter), FailingAt(1 if attempt == 0 else 0),
                                               bucket_bytes=1024)
                        else:
                            sync_weights(mgr, exporter, FailingAt(2 if attempt == 0 else 0))
                        outcome = "ok"
                    except MemmgrSyncError as exc:
                        outcome = f"error: {exc}"
                    with open(f"{workdir}/outcome{rank}-{attempt}", "w") as f:
                        f.write(outcome)
                    dist.barrier()  # a rank still inside the export never gets here (its peer's next export would
                    # otherwise pair with its leftover messages)
            finally:
                mgr.close()
                pool.trim()
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()


@pytest.mark.parametrize("path", ["sync_weights", "source"])
def test_a_transport_failing_on_the_receiver_leaves_no_rank_waiting_in_the_export(megatron_env, path, tmp_path):
    _spawn(_failing_sync_worker, (2, path, str(tmp_path)), 2)
    outcomes = {(r, a): (tmp_path / f"outcome{r}-{a}").read_text() for r in (0, 1) for a in (0, 1)}
    assert "the engine went away" in outcomes[(0, 0)]  # the receiver's sync failed, saying why
    assert outcomes[(1, 0)] == "ok"  # the other rank finished its part of the export
    assert outcomes[(0, 1)] == outcomes[(1, 1)] == "ok"  # and both sync again
