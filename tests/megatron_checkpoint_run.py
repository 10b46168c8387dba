"""TEST-ONLY: checkpoints of a megatron-core trainer under for_megatron, run as its own process by
test_megatron_checkpoint.py (a regression that reads freed memory would crash this process, not pytest).

For one configuration it trains a reference without memmgr, saves a ``dist_checkpointing`` checkpoint after the first
step, trains on, and resumes from the checkpoint in a fresh model; then does the same under for_megatron with the
checkpoint saved while the groups are offloaded, loads it back into the managed model (also while offloaded), offloads
and onloads between steps, closes the manager and manages the model again, and resumes a fresh model under a new
manager. Prints one JSON object, per configuration: the losses and final parameter checksums of each run, and the group
sizes before and after the load.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")
# The distributed optimizer of megatron-core 0.16 saves only with an explicit sharding type.
META = {"distrib_optim_sharding_type": "dp_reshardable"}


def main(configs: list[str]) -> None:
    import test_megatron_cpu as T
    from memmgr.tools.megatron_cpu_shim import cpu_megatron
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from memmgr.host_memory import HostMemoryPool

    # The async writer logs its memory with psutil, which the CPU test environment does not install.
    filesystem_async._process_memory = lambda: 0
    with cpu_megatron():
        from megatron.core import parallel_state

        workdir = tempfile.mkdtemp()
        torch.distributed.init_process_group("gloo", init_method=f"file://{workdir}/init", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        data = T.batches(3)
        pool = HostMemoryPool(pin=False)
        results = {}
        for config in configs:
            results[config] = run(config, os.path.join(workdir, config), data, pool)
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    print(json.dumps(results))


def run(config, workdir, data, pool) -> dict:
    import test_megatron_cpu as T
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    from memmgr.integrations.megatron import for_megatron

    def save(ddp, opt, path):
        os.makedirs(path)
        msd = unwrap_model(ddp).sharded_state_dict()
        dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(msd, metadata=META)}, path)

    def load(ddp, opt, path):
        for inner in opt.chained_optimizers:  # a fresh optimizer has no state to load into yet: give it Adam's
            if not inner.optimizer.state and inner.init_state_fn is not None:
                inner.init_state_fn(inner.optimizer, inner.config)
                for state in inner.optimizer.state.values():
                    state.setdefault("step", torch.tensor(0.0))
        msd = unwrap_model(ddp).sharded_state_dict()
        loaded = dist_checkpointing.load({"model": msd, "optimizer": opt.sharded_state_dict(
            msd, is_loading=True, metadata=META)}, path)
        unwrap_model(ddp).load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])

    def digest(ddp):
        return [int(T.bits(p).to(torch.int64).sum()) for p in ddp.parameters()]

    def rest(ddp, opt, mgr=None):
        losses = []
        for batch in data[1:]:
            losses.append(T.train_step(ddp, opt, *batch))
            if mgr is not None:
                mgr.offload()
                mgr.onload()
        return losses

    out: dict = {}
    # reference, without memmgr
    ddp, opt = T.build(config)
    first = T.train_step(ddp, opt, *data[0])
    save(ddp, opt, os.path.join(workdir, "ref"))
    out["reference"] = [first] + rest(ddp, opt)
    out["reference_params"] = digest(ddp)
    load(ddp, opt, os.path.join(workdir, "ref"))  # back into the live trainer
    out["reference_reloaded"] = rest(ddp, opt)
    ddp, opt = T.build(config)
    load(ddp, opt, os.path.join(workdir, "ref"))  # into a fresh one
    out["reference_resumed"] = rest(ddp, opt)
    out["reference_resumed_params"] = digest(ddp)

    # under for_megatron
    ddp, opt = T.build(config)
    mgr = for_megatron(ddp, opt, pool=pool)
    first = T.train_step(ddp, opt, *data[0])
    mgr.offload()
    save(ddp, opt, os.path.join(workdir, "managed"))  # saved while offloaded
    out["saved_offloaded_states"] = {n: s.state for n, s in mgr.state.items()}
    mgr.onload()
    out["managed"] = [first] + rest(ddp, opt, mgr)
    out["managed_params"] = digest(ddp)
    sizes = {n: s.nbytes for n, s in mgr.state.items()}
    mgr.offload()
    load(ddp, opt, os.path.join(workdir, "managed"))  # loaded into the managed model, while offloaded
    mgr.offload()  # the loaded state is re-collected; nothing refers to the buckets from outside
    out["sizes_before_load"] = sizes
    out["sizes_after_load"] = {n: s.nbytes for n, s in mgr.state.items()}
    out["device_bytes_offloaded_after_load"] = {n: s.device_bytes for n, s in mgr.state.items()}
    mgr.onload()
    out["managed_reloaded"] = rest(ddp, opt, mgr)
    mgr.close()
    mgr = for_megatron(ddp, opt, pool=pool)  # managed again after close
    mgr.offload()
    out["remanaged_off_bytes"] = sum(s.device_bytes for s in mgr.state.values())
    mgr.onload()
    mgr.close()

    ddp, opt = T.build(config)  # a fresh trainer resumes under a new manager
    mgr = for_megatron(ddp, opt, pool=pool)
    mgr.offload()
    load(ddp, opt, os.path.join(workdir, "managed"))
    mgr.offload()
    mgr.onload()
    out["resumed_under_new_manager"] = rest(ddp, opt, mgr)
    out["resumed_params"] = digest(ddp)
    mgr.close()
    return out


if __name__ == "__main__":
    from memmgr.tools.cpu_math import warm_up_vml
    warm_up_vml()  # the run is compared bit for bit (memmgr.tools.cpu_math)
    main(sys.argv[1:])
