"""TEST-ONLY: VerlOffload.install_helpers against the real verl package, run as its own process by
test_verl_integration.py (verl's folder, MEMMGR_VERL_SITE, is on this process's PYTHONPATH only). verl's trainer
engines bind the helpers with ``from verl.utils.megatron_utils import ...`` / ``from verl.utils.fsdp_utils import
...``: the engine modules need more of verl's dependencies than CI installs, so their own import statements (read from
verl's source) run in stand-in modules. Prints one JSON object."""
from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
import types
import warnings

import torch

warnings.filterwarnings("ignore")
ENGINES = {"megatron": "verl/workers/engine/megatron/transformer_impl.py",
           "fsdp": "verl/workers/engine/fsdp/transformer_impl.py"}


def engine_imports(family: str) -> types.ModuleType:
    """A module that runs the engine module's own ``from verl.utils.<family>_utils import ...`` statement."""
    import verl

    source = open(os.path.join(os.path.dirname(os.path.dirname(verl.__file__)), ENGINES[family])).read()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.ImportFrom) and n.module == f"verl.utils.{family}_utils")
    module = types.ModuleType(f"engine_imports_{family}")
    sys.modules[module.__name__] = module
    exec(compile(ast.Module([node], []), module.__name__, "exec"), module.__dict__)
    return module


def raised(fn, *args) -> str | None:
    try:
        fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def snapshot(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named}


def same(tensors, snap) -> bool:
    return all(t.dtype == snap[n].dtype and torch.equal(t, snap[n]) for n, t in tensors)


def plain(callers: dict[str, types.ModuleType]) -> dict:
    """A torch trainer (memmgr.for_module) moved by verl's helpers, FSDP's and megatron's (verl's reference-model
    path takes a list of plain modules)."""
    import memmgr
    from memmgr.integrations.verl import VerlOffload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    params = list(model.named_parameters())
    ids = [id(p) for _, p in params]
    weights = snapshot(params)
    states = snapshot((f"{i}.{k}", v) for i, s in enumerate(opt.state.values()) for k, v in s.items())
    mgr = memmgr.for_module(model, opt)
    handle = VerlOffload(mgr).install_helpers()
    out: dict = {}

    def bytes_by_group():
        return {n: s.device_bytes for n, s in mgr.state.items()}

    for family, caller in callers.items():
        m = family == "megatron"
        target = [model] if m else model
        offload_model = getattr(caller, f"offload_{family}_model_to_cpu")
        load_model = getattr(caller, f"load_{family}_model_to_gpu")
        offload_opt = getattr(caller, f"offload_{family}_optimizer")
        load_opt = getattr(caller, f"load_{family}_optimizer")
        steps = {}
        offload_model(target)
        offload_model(target)  # idempotent, as verl's
        steps["model_off"] = bytes_by_group()
        steps["grads_after_offload"] = mgr.state["grads"].state
        offload_opt(opt)
        steps["all_off"] = bytes_by_group()
        if m:
            load_model(target, False)  # load_grad=False, positionally as verl may pass it
        else:
            load_model(target)
        steps["model_on"] = bytes_by_group()
        load_opt(opt) if m else load_opt(opt, "cpu")
        load_opt(opt) if m else load_opt(opt, "cpu")
        steps["all_on"] = bytes_by_group()
        steps["same_objects"] = [id(p) for _, p in model.named_parameters()] == ids
        steps["bit_exact"] = same(model.named_parameters(), weights) and same(
            ((f"{i}.{k}", v) for i, s in enumerate(opt.state.values()) for k, v in s.items()), states)
        steps["foreign_model"] = raised(offload_model, [torch.nn.Linear(2, 2)] if m else torch.nn.Linear(2, 2))
        steps["foreign_optimizer"] = raised(
            offload_opt, torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
        out[family] = steps
    handle.remove()
    mgr.close()
    return out


def megatron(caller: types.ModuleType) -> dict:
    """A megatron-core GPT in DDP with its distributed optimizer (memmgr.for_megatron), one gloo rank on the CPU,
    moved by the helpers as verl's megatron engine binds them."""
    import memmgr
    from memmgr.integrations.verl import VerlOffload
    from memmgr.tools.megatron_models import build_gpt, single_rank_megatron

    with tempfile.TemporaryDirectory() as tmp, single_rank_megatron(tmp):
        ddp, opt = build_gpt(layers=2, hidden=64, heads=4, vocab=128, seq=16, cpu_init=True, device=None)
        params = list(ddp.named_parameters())
        weights = snapshot(params)
        mains = snapshot((str(i), p) for i, p in enumerate(
            p for inner in getattr(opt, "chained_optimizers", [opt]) for g in inner.optimizer.param_groups
            for p in g["params"]))
        mgr = memmgr.for_megatron([ddp], opt)
        out = {}
        with VerlOffload(mgr).install_helpers():
            caller.offload_megatron_model_to_cpu([ddp])
            caller.offload_megatron_optimizer(opt)
            out["all_off"] = {n: s.device_bytes for n, s in mgr.state.items()}
            caller.load_megatron_model_to_gpu([ddp], load_grad=True)
            caller.load_megatron_optimizer(opt)
            out["all_on"] = {n: s.device_bytes for n, s in mgr.state.items()}
            out["bit_exact"] = same(ddp.named_parameters(), weights) and same(
                ((str(i), p) for i, p in enumerate(
                    p for inner in getattr(opt, "chained_optimizers", [opt]) for g in inner.optimizer.param_groups
                    for p in g["params"])), mains)
            out["same_objects"] = [id(p) for _, p in ddp.named_parameters()] == [id(p) for _, p in params]
            out["foreign_model"] = raised(caller.offload_megatron_model_to_cpu, [torch.nn.Linear(2, 2)])
        mgr.close()
    return out


def main() -> None:
    import verl.utils.megatron_utils as megatron_utils

    try:
        import verl.utils.fsdp_utils as fsdp_utils
    except ImportError:  # peft / accelerate missing
        fsdp_utils = None
    from memmgr.integrations.verl import HELPERS, VerlOffload

    defining = {"megatron": megatron_utils, "fsdp": fsdp_utils}
    callers = {f: engine_imports(f) for f, mod in defining.items() if mod is not None}
    names = [n for n, (mod, _) in HELPERS.items() if sys.modules.get(mod) is not None]
    originals = {n: getattr(sys.modules[HELPERS[n][0]], n) for n in names}
    places = [sys.modules[HELPERS[n][0]] for n in names] + [callers[f] for f in callers]

    def bound():
        return {f"{p.__name__}.{n}": ("verl" if getattr(p, n) is originals[n] else "memmgr") for p in places
                for n in names if hasattr(p, n)}

    result = {"fsdp_imports": fsdp_utils is not None, "before": bound()}
    import memmgr

    mgr = memmgr.for_module(torch.nn.Linear(2, 2))
    handle = VerlOffload(mgr).install_helpers()
    result["installed"] = bound()
    late = engine_imports("megatron")  # imported while installed: binds memmgr's
    places.append(late)
    result["late_import"] = {n: getattr(late, n) is not originals[n] for n in names if hasattr(late, n)}
    handle.remove()
    handle.remove()  # twice: nothing more
    result["removed"] = bound()
    mgr.close()
    result["plain"] = plain(callers)
    result["after_plain"] = bound()
    result["megatron"] = megatron(callers["megatron"])
    result["after_megatron"] = bound()
    print(json.dumps(result))


if __name__ == "__main__":
    from memmgr.tools.cpu_math import warm_up_vml
    warm_up_vml()  # the run is compared bit for bit (memmgr.tools.cpu_math)
    main()
