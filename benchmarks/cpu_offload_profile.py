"""Host-side cost of for_megatron's offload/onload, on the CPU: python benchmarks/cpu_offload_profile.py

Builds a 24-layer megatron-core GPT (hidden 256, so the copies are small and the Python bookkeeping shows) through
memmgr.tools.megatron_cpu_shim (CUDA calls redirected to the CPU; its __torch_function__ inflates every torch call,
so the times are upper bounds), takes a step, then times three offload/onload cycles and prints a cProfile of one of
each (the 20 costliest calls by cumulative time). Needs no GPU; writes nothing but stdout.
"""
import argparse
import cProfile
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root))  # memmgr from this checkout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=3, help="timed offload/onload cycles before the profiles")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch
    from memmgr.tools.megatron_cpu_shim import cpu_megatron

    with cpu_megatron():
        from megatron.core import parallel_state

        torch.distributed.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        from memmgr.integrations.megatron import for_megatron
        from memmgr.tools.bench_megatron import train_step
        from memmgr.tools.megatron_models import build_gpt

        ddp, opt = build_gpt(layers=24, hidden=256, heads=8, ffn=1024, vocab=1000, seq=16, cpu_init=True)
        tokens, labels = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
        train_step(ddp, opt, tokens, labels)
        mgr = for_megatron(ddp, opt)
        for _ in range(args.cycles):
            t0 = time.perf_counter()
            mgr.offload()
            t1 = time.perf_counter()
            mgr.onload()
            print(f"offload {1e3 * (t1 - t0):.1f} ms, onload {1e3 * (time.perf_counter() - t1):.1f} ms", flush=True)
        for name in ("offload", "onload"):
            prof = cProfile.Profile()
            prof.enable()
            getattr(mgr, name)()
            prof.disable()
            print(f"===== {name}")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumtime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
