"""The bench's parts that its workloads share: the training state, the methods that move it (memmgr and its
peers), timing, the same-run peak, checksums and one method's cycles (``run_method``)."""
from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from memmgr.errors import MemmgrInputError

logger = logging.getLogger("memmgr")

GB = 1e9
GiB = 2**30
DEFAULT_PHASE_GAP_S = 0.5  # on a GPU; see the module docstring


def phase_gap_for(device: torch.device, requested: float | None) -> float:
    """The untimed pause between offload and onload (and after onload): ``requested`` if given, else
    DEFAULT_PHASE_GAP_S on a GPU and none on the CPU path (nothing there works in the background)."""
    if requested is not None:
        if requested < 0:
            raise MemmgrInputError(f"bench phase gap: {requested} s is negative; give 0 (back-to-back cycles) or more")
        return requested
    return DEFAULT_PHASE_GAP_S if device.type == "cuda" else 0.0


# ---------------------------------------------------------------- the state
@dataclass
class TrainingState:
    """Tensors shaped like a GPT's training state: per parameter bf16 weight, fp32 grad, fp32 main weight, Adam."""

    weights: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    main_weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]

    @property
    def copied(self) -> list[torch.Tensor]:
        return list(self.weights.values()) + list(self.main_weights.values()) + list(self.moments.values())

    @property
    def copied_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.copied)

    @property
    def dropped_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grads.values())

    @property
    def num_tensors(self) -> int:
        return len(self.weights) + len(self.grads) + len(self.main_weights) + len(self.moments)


def gpt_shapes(hidden: int, layers: int, vocab: int = 32000) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("embedding.word_embeddings.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "input_layernorm.bias", (hidden,)),
                   (p + "self_attention.linear_qkv.weight", (3 * hidden, hidden)),
                   (p + "self_attention.linear_qkv.bias", (3 * hidden,)),
                   (p + "self_attention.linear_proj.weight", (hidden, hidden)),
                   (p + "self_attention.linear_proj.bias", (hidden,)),
                   (p + "pre_mlp_layernorm.weight", (hidden,)), (p + "pre_mlp_layernorm.bias", (hidden,)),
                   (p + "mlp.linear_fc1.weight", (4 * hidden, hidden)), (p + "mlp.linear_fc1.bias", (4 * hidden,)),
                   (p + "mlp.linear_fc2.weight", (hidden, 4 * hidden)), (p + "mlp.linear_fc2.bias", (hidden,))]
    shapes += [("decoder.final_layernorm.weight", (hidden,)), ("decoder.final_layernorm.bias", (hidden,))]
    return shapes


def layers_for_size(copied_bytes: float, hidden: int, vocab: int = 32000) -> int:
    per_param = 2 + 4 + 8  # copied bytes per parameter: bf16 weight, fp32 main weight, two fp32 moments
    per_layer = 12 * hidden * hidden + 13 * hidden
    return max(1, round((copied_bytes / per_param - vocab * hidden) / per_layer))


def make_state(copied_bytes: float, device: torch.device, hidden: int | None = None, seed: int = 0) -> TrainingState:
    if hidden is None:  # realistic widths for the size, so that small states are not all embedding
        hidden = 2048 if copied_bytes >= 8 * GB else 1024 if copied_bytes >= 1 * GB else 256
    shapes = gpt_shapes(hidden, layers_for_size(copied_bytes, hidden))
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(shape, dtype):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return TrainingState(
        weights={n: rand(s, torch.bfloat16) for n, s in shapes},
        grads={n + ".grad": rand(s, torch.float32) for n, s in shapes},
        main_weights={n + ".main": rand(s, torch.float32) for n, s in shapes},
        moments={n + f".{k}": rand(s, torch.float32) for n, s in shapes for k in ("exp_avg", "exp_avg_sq")})


def make_small_tensors(count: int, nbytes_each: int, device: torch.device) -> TrainingState:
    numel = nbytes_each // 4
    return TrainingState(weights={}, grads={}, main_weights={},
                         moments={f"t{i}": torch.full((numel,), float(i), device=device) for i in range(count)})


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def pinned_peak(device: torch.device, nbytes: int = 2 * GiB, repeats: int = 10) -> dict[str, float]:
    """GB/s of one large copy each way, and both ways at once on two streams, into pinned memory: the best of
    ``repeats``, because the link's throughput can drift by up to ~15% from one copy to the next, and a peak taken
    from a few copies could land in a slow stretch and flatter every ratio."""
    if device.type != "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8)
        src.fill_(1)
        dst = torch.empty_like(src)
        best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
        return {"d2h": nbytes / best / GB, "h2d": nbytes / best / GB, "both": 2 * nbytes / best / GB}
    from memmgr.tools.measure import measure_pinned_peak

    return measure_pinned_peak(nbytes, device, iters=repeats)


_CHECKSUM_CHUNK = 1 << 26  # words per reduction: bounds its int64 temporary to 512 MiB whatever the tensor's size


def checksum(tensors: list[torch.Tensor]) -> list[int]:
    """One integer per tensor from its raw bytes: equal lists mean the contents came back (cheap, on the device)."""
    sums = []
    for t in tensors:
        raw = t.detach().reshape(-1).view(torch.uint8)
        aligned = raw.numel() - raw.numel() % 4 if raw.storage_offset() % 4 == 0 else 0
        words = raw[:aligned].view(torch.int32) if aligned else raw.new_empty(0, dtype=torch.int32)
        total = strided = 0
        for part in (words[i:i + _CHECKSUM_CHUNK] for i in range(0, words.numel(), _CHECKSUM_CHUNK)):
            total += int(part.sum(dtype=torch.int64))
            strided += int(part[::7].sum(dtype=torch.int64))
        for part in (raw[i:i + _CHECKSUM_CHUNK] for i in range(aligned, raw.numel(), _CHECKSUM_CHUNK)):
            total += int(part.sum(dtype=torch.int64))
        sums.append(total ^ (strided << 1))
    return sums


# ---------------------------------------------------------------- methods
class Method:
    """One way of moving the state off the GPU and back. ``setup`` may pin or allocate ahead of time."""

    name = "method"
    description = ""

    def available(self) -> str | None:
        return None  # or the reason it cannot run here

    def setup(self, state: TrainingState) -> None: ...

    def offload(self, state: TrainingState) -> None: ...

    def onload(self, state: TrainingState) -> None: ...

    def paths_ran(self) -> dict[str, object] | None:
        """After a cycle: which copy paths moved its bytes (None: the method does not say)."""
        return None

    def host_bytes(self) -> dict[str, int]:
        return {}

    def teardown(self) -> None: ...


class MemmgrMethod(Method):
    name = "memmgr"
    description = "memmgr MemoryManager: flat buckets, exact-size pinned host stores, copy streams"

    def setup(self, state):
        from memmgr.host_memory import HostMemoryPool

        self.pool = HostMemoryPool()
        self.mgr = self.build_manager(state, self.pool)

    def build_manager(self, state, pool, **manager_options):
        from memmgr.manager import MemoryManager

        mgr = MemoryManager(pool=pool, **manager_options)
        mgr.add_group("weights", state.weights)
        mgr.add_group("grads", state.grads, policy="discard")
        mgr.add_group("main_weights", state.main_weights)
        mgr.add_group("optimizer_states", state.moments)
        return mgr

    def offload(self, state):
        self.mgr.offload()

    def onload(self, state):
        self.mgr.onload()

    def paths_ran(self):
        from memmgr import driver_settle
        from memmgr.transfer import copy_paths_status

        last = copy_paths_status()["last"]
        return {"onload": last.get("h2d"), "offload": last.get("d2h"),
                "driver_settle_ms": driver_settle.status()["last_ms"]}

    def host_bytes(self):
        return {"pinned": self.pool.pinned_bytes_held, "pageable": self.pool.bytes_held - self.pool.pinned_bytes_held}

    def teardown(self):
        self.mgr.close()
        self.pool.trim()
        # the buckets must not keep the state's storages alive for the next method (megatron's built-ins rebind)
        del self.mgr, self.pool


class MemmgrSameAddressMethod(MemmgrMethod):
    name = "memmgr-same-address"
    description = ("memmgr with same_address=True: the buckets' memory is released and mapped again at the same "
                   "addresses (CUDA graphs survive)")

    def available(self):
        from memmgr.same_address import same_address_support

        supported, why = same_address_support()
        return None if supported else why

    def build_manager(self, state, pool, **manager_options):
        return super().build_manager(state, pool, same_address=True, **manager_options)


class PerTensorMethod(Method):
    """Per-tensor copies to fresh host tensors, storage freed in place (the pattern several RL frameworks use).

    Like memmgr, it ends its offload with ``torch.cuda.empty_cache()`` (as verl does after offloading): the point of an
    offload is memory the inference engine can allocate, and memory PyTorch still caches is not."""

    def __init__(self, pinned_cache: bool):
        self.pinned_cache = pinned_cache
        self.name = "per_tensor_to_cpu_non_blocking" if pinned_cache else "per_tensor_cpu_pageable"
        self.description = ("per-tensor .to('cpu', non_blocking=True) (PyTorch's pinned cache)" if pinned_cache
                            else "per-tensor .cpu() / copy back through pageable memory")
        self.host: dict[int, torch.Tensor] = {}
        self.storage_bytes: dict[int, int] = {}

    def setup(self, state):
        # keyed by id(): a state built for the previous condition is gone, and its tensors' ids may be reused
        self.host.clear()
        self.storage_bytes.clear()

    def offload(self, state):
        device = state.copied[0].device
        for t in state.copied:
            if t.device.type == "cpu":  # .cpu() of a CPU tensor is the tensor itself: copy for the same work
                self.host[id(t)] = t.clone()
            else:
                self.host[id(t)] = t.to("cpu", non_blocking=True) if self.pinned_cache else t.cpu()
        _sync(device)
        freed = state.copied + list(state.grads.values())
        for t in freed:  # all sizes first: tensors that share a storage see it freed by the first resize
            self.storage_bytes.setdefault(id(t), t.untyped_storage().nbytes())
        for t in freed:
            t.untyped_storage().resize_(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def onload(self, state):
        for t in state.copied:
            t.untyped_storage().resize_(self.storage_bytes[id(t)])
            t.copy_(self.host.pop(id(t)), non_blocking=self.pinned_cache)
        for g in state.grads.values():
            g.untyped_storage().resize_(self.storage_bytes[id(g)])
            g.zero_()
        _sync(state.copied[0].device)

    def host_bytes(self):
        if self.pinned_cache and torch.cuda.is_available():
            stats = torch.cuda.host_memory_stats()  # the pinned cache rounds each block up to a power of two
            held = max([v for k, v in stats.items() if k.endswith("bytes.current")] or [0])
            return {"pinned": int(held)}
        return {"pageable": sum(t.numel() * t.element_size() for t in self.host.values())}

    def teardown(self):
        self.host.clear()
        self.storage_bytes.clear()
        if self.pinned_cache and torch.cuda.is_available():
            torch.cuda.synchronize()  # cached pinned blocks are released only once their copies are complete
            torch._C._host_emptyCache()


_pools_released_only_in_a_region = False


def teardown_unsafe_at_exit() -> bool:
    """Whether a peer left native state that the interpreter's own teardown cannot release: torch_memory_saver's
    pools, whose free hook (``tms_torch_free``) aborts the process when memory is freed outside one of its regions,
    as the pools are at exit."""
    return _pools_released_only_in_a_region


class TorchMemorySaverMethod(Method):
    name = "torch_memory_saver"
    description = "torch_memory_saver region with CPU backup, pause/resume (hook_mode='torch')"
    allocates_own_state = True

    def available(self):
        if not torch.cuda.is_available():
            return "needs CUDA"
        try:
            import torch_memory_saver  # noqa: F401
        except ImportError:
            return "torch_memory_saver not installed"
        return None

    def make_state(self, copied_bytes, device):
        from torch_memory_saver import torch_memory_saver as tms

        global _pools_released_only_in_a_region
        _pools_released_only_in_a_region = True
        try:
            tms.hook_mode = "torch"
        except (AssertionError, AttributeError):  # set by an earlier state in this process; it cannot change after
            pass
        with tms.region(enable_cpu_backup=True):
            return make_state(copied_bytes, device)

    def offload(self, state):
        from torch_memory_saver import torch_memory_saver as tms

        tms.pause()

    def onload(self, state):
        from torch_memory_saver import torch_memory_saver as tms

        tms.resume()
        for g in state.grads.values():
            g.zero_()


# ---------------------------------------------------------------- running
@dataclass
class MethodResult:
    method: str
    description: str
    copied_bytes: int
    dropped_bytes: int
    num_tensors: int
    offload_s: list[float] = field(default_factory=list)
    onload_s: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    host_bytes: dict = field(default_factory=dict)
    gpu_released_bytes: int | None = None
    gpu_left_over_bytes: int | None = None
    torch_reserved_left_over: int | None = None
    intact: bool | None = None
    error: str | None = None
    paths: list[dict] = field(default_factory=list)  # per cycle, what Method.paths_ran said

    def gbps(self, seconds: float) -> float:
        return self.copied_bytes / seconds / GB if seconds > 0 else math.inf

    def summary(self, peak: dict[str, float]) -> dict:
        out = asdict(self)
        if self.offload_s and self.onload_s:  # a method that failed part-way reports its error instead
            steady_off = statistics.median(self.offload_s[1:] or self.offload_s)
            steady_on = statistics.median(self.onload_s[1:] or self.onload_s)
            out.update(cycles=len(self.offload_s), first_offload_gbps=self.gbps(self.offload_s[0]),
                       steady_offload_gbps=self.gbps(steady_off),
                       first_onload_gbps=self.gbps(self.onload_s[0]), steady_onload_gbps=self.gbps(steady_on),
                       first_offload_ratio=self.gbps(self.offload_s[0]) / peak["d2h"],
                       steady_offload_ratio=self.gbps(steady_off) / peak["d2h"],
                       steady_onload_ratio=self.gbps(steady_on) / peak["h2d"])
        return out


def process_gpu_bytes(device: torch.device) -> int | None:
    """This process's GPU memory as NVML sees it (the driver's device-wide figure where NVML cannot say)."""
    if device.type != "cuda":
        return None
    from memmgr import nvml

    index = nvml.nvml_index(device.index or 0)
    proc = nvml.process_memory(index) if index is not None else None
    if proc is not None and proc.nbytes is not None:
        return proc.nbytes
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def gpu_baseline(device: torch.device) -> tuple[int | None, int]:
    """(this process's GPU bytes as NVML sees them, PyTorch's reserved bytes) once garbage is collected, the device
    synchronized and PyTorch's cache released: what a method's GPU left over is counted from."""
    gc.collect()  # a model freed by the previous method may still sit in reference cycles
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return process_gpu_bytes(device), torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def run_method(method: Method, copied_bytes: float, device: torch.device, cycles: int,
               make: Callable[[], TrainingState], baseline: tuple[int | None, int] | None = None,
               phase_gap_s: float = 0.0, between: Callable[[], object] | None = None) -> MethodResult:
    """Times ``cycles`` offload/onload rounds of one method, with an untimed pause of ``phase_gap_s`` after each
    offload and each onload (the phases in between). ``between``, if given, replaces the pause after each offload
    (e.g. an engine in another process taking the freed memory and releasing it: ``EngineStandIn.cycle``), so the
    onload starts right after it returns. ``baseline``: (NVML bytes, memory_reserved) before the state existed,
    when ``make`` returns a state built earlier (the Megatron workload) or the method's own pool may still hold an
    earlier state's memory (``run_under_conditions``); else measured here."""
    now = gpu_baseline(device)
    gpu_before, reserved_baseline = baseline if baseline is not None else now
    try:
        state = method.make_state(copied_bytes, device) if getattr(method, "allocates_own_state", False) else make()
    except Exception as exc:  # a peer that cannot even build its state must not stop the comparison
        logger.exception("method %s failed to build its state", method.name)
        result = MethodResult(method.name, method.description, 0, 0, 0)
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result = MethodResult(method.name, method.description, state.copied_bytes, state.dropped_bytes, state.num_tensors)
    try:
        before = checksum(state.copied)
        result.setup_s = timed(lambda: method.setup(state), device)
        loaded = process_gpu_bytes(device)
        for cycle in range(cycles):
            result.offload_s.append(timed(lambda: method.offload(state), device))
            if cycle == 0:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                after = process_gpu_bytes(device)
                if loaded is not None and after is not None:
                    result.gpu_released_bytes = loaded - after
                    result.gpu_left_over_bytes = after - gpu_before if gpu_before is not None else None
                if device.type == "cuda":
                    result.torch_reserved_left_over = torch.cuda.memory_reserved(device) - reserved_baseline
                result.host_bytes = method.host_bytes()
            if between is not None:
                between()
            else:
                time.sleep(phase_gap_s)
            result.onload_s.append(timed(lambda: method.onload(state), device))
            ran = method.paths_ran()
            if ran is not None:
                result.paths.append(ran)
            time.sleep(phase_gap_s)
        result.intact = checksum(state.copied) == before
        method.teardown()
    except Exception as exc:  # a peer failing must not stop the comparison
        logger.exception("method %s failed", method.name)
        result.error = f"{type(exc).__name__}: {exc}"
    state = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_under_conditions(method: Method, conditions: dict[str, Callable[[], object] | None],
                         by_condition: dict[str, list], peak: dict[str, float], cycles: int, **run: object) -> None:
    """Runs ``method`` once per condition (name -> the ``between`` step of ``run_method``, None for the pause) and
    appends each summary to ``by_condition[name]``; a method that cannot run here is recorded as skipped under every
    condition. ``run`` goes to ``run_method`` (copied_bytes, device, make, phase_gap_s, baseline)."""
    reason = method.available()
    if reason:
        for rows in by_condition.values():
            rows.append({"method": method.name, "skipped": reason})
        return
    if getattr(method, "allocates_own_state", False) and run.get("baseline") is None:
        # Its own pool may keep the memory of one condition's state through the next (torch_memory_saver's does):
        # every condition counts what is left over from before the first state.
        run = dict(run, baseline=gpu_baseline(run["device"]))  # type: ignore[arg-type]
    for name, between in conditions.items():
        result = run_method(method, cycles=cycles, between=between, **run)  # type: ignore[arg-type]
        by_condition[name].append(result.summary(peak))
        logger.info("%s (%s): offload %s s, onload %s s, intact %s", method.name, name,
                    [round(x, 3) for x in result.offload_s], [round(x, 3) for x in result.onload_s], result.intact)


def memmgr_cycles(cycles: int) -> int:
    """memmgr's cycles take a second, the peers' up to a minute: memmgr runs at least 5, so that its steady state is
    a median of 4 rather than 2 (the link's throughput varies by several percent from cycle to cycle)."""
    return max(cycles, 5)


def default_size(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.25 * GB
    free, _ = torch.cuda.mem_get_info(device)
    # the state on the GPU is copied bytes * 18/14 (grads too); keep a wide margin for the peers' own buffers
    return float(min(16 * GiB, free * 0.5 * 14 / 18))


def all_methods() -> list[Method]:
    return [MemmgrMethod(), MemmgrSameAddressMethod(), PerTensorMethod(pinned_cache=True),
            PerTensorMethod(pinned_cache=False), TorchMemorySaverMethod()]
