"""GPU reliability checks: python benchmarks/gpu_reliability.py --out DIR [--oom-gib 8] [--verify-gib 4]

Sections (each in its own try/except; a failure is recorded and the next section runs):

1. oom_onload: offload a ~8 GiB group, fill the GPU until torch.OutOfMemoryError (the filler is kept), onload ->
   MemmgrOutOfMemoryError naming the group, the bytes needed and the bytes free; nothing half-restored (device_bytes
   == 0, every bucket on_host), then the filler is freed and the retry must be bit-exact.
2. interrupted_transfers: non-blocking offload/onload of several groups through a MemoryManager, interrupted while
   issuing (KeyboardInterrupt from a group between groups, an exception from an after_* hook, and real
   ``_thread.interrupt_main()`` at random moments); after wait() every group must be wholly on the GPU or wholly on
   the host with the state enum saying which, and the contents bit-exact once completed.
3. stream_ordering: a long kernel (torch.cuda._sleep) then writes on the current stream, offload at once: the host
   copy must hold the final values; the freed block must not be reused while the copy reads it; onload followed at
   once by compute (no explicit sync) must read the restored values.
4. verify: with verify=True a flipped byte in the host store makes onload raise MemmgrCorruptionError naming the
   bucket (group left on_host, repair -> bit-exact); cost of offload+onload of ~4 GiB with vs without verify.

Writes DIR/reliability.json (each section's checks, data and error, with the run's metadata) and prints a summary.
Contents are generated from seeds on the GPU and regenerated for comparison, so checking ~8 GiB needs one tensor of
extra memory, not a second copy.
"""
from __future__ import annotations

import _thread
import argparse
import random
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import lab
import memmgr
from lab import GiB, MiB, bits, sync, timed
from memmgr import (BucketizedFlatTensors, BucketState, GroupState, HostMemoryPool, MemmgrCorruptionError,
                    MemmgrOutOfMemoryError, MemoryManager)
from memmgr.checksum import bucket_checksum

TENSOR_BYTES = 256 * MiB


# ---- helpers ----

class Section:
    """Collects named checks (never raises on a failed check) and the error that ended the section, if any."""

    def __init__(self, name: str):
        self.name = name
        self.checks: dict[str, dict[str, Any]] = {}
        self.data: dict[str, Any] = {}
        self.error: str | None = None
        self.seconds = 0.0

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        print(f"  [{'ok' if ok else 'FAIL'}] {self.name}.{name}" + (f": {detail}" if detail is not None else ""),
              flush=True)
        return bool(ok)

    @property
    def ok(self) -> bool:
        return self.error is None and all(c["ok"] for c in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "checks": self.checks, "data": self.data,
                "error": self.error}


def make_tensor(seed: int, nbytes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random bits of ``nbytes`` as ``dtype`` (every bit pattern occurs; compared bitwise)."""
    g = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device, generator=g)
    return raw.view(dtype).clone()  # clone: a tensor that owns its storage (no _base holding it too)


def make_tensors(gib: float, seed: int, device: torch.device) -> tuple[list[torch.Tensor], list[tuple]]:
    n = max(1, int(gib * GiB) // TENSOR_BYTES)
    specs = [(seed + i, TENSOR_BYTES, torch.bfloat16 if i % 2 else torch.float32) for i in range(n)]
    return [make_tensor(s, b, d, device) for s, b, d in specs], specs


def mismatches(tensors: list[torch.Tensor], specs: list[tuple], device: torch.device) -> list[int]:
    """Indices of tensors whose bits differ from the regenerated expected contents (one tensor of extra memory)."""
    bad = []
    for i, (t, (s, b, d)) in enumerate(zip(tensors, specs)):
        expected = make_tensor(s, b, d, device)
        if t.untyped_storage().nbytes() == 0 or not torch.equal(bits(t), bits(expected)):
            bad.append(i)
        del expected
    return bad


def bucket_consistency(group: BucketizedFlatTensors, kind: str = "all") -> list[str]:
    """Buckets whose device storage disagrees with their state (after wait()). ``kind``: "unsafe" (state on_device
    with the storage freed, or a transfer that never completes: using or moving it again is unsafe), "held" (state
    off the device with device memory still held: a leak until the next onload), or "all"."""
    unsafe, held = [], []
    for b in group.buckets:
        st = b.state
        if st is BucketState.ON_DEVICE and b.device_bytes != b.nbytes:
            unsafe.append(f"{b.name}: on_device but {b.device_bytes}/{b.nbytes} B on the GPU")
        if st in (BucketState.ON_HOST, BucketState.DISCARDED) and b.device_bytes != 0:
            held.append(f"{b.name}: {st.value} but still {b.device_bytes} B on the GPU")
        if st in (BucketState.OFFLOADING, BucketState.ONLOADING):
            unsafe.append(f"{b.name}: still {st.value} after wait()")
    return {"unsafe": unsafe, "held": held, "all": unsafe + held}[kind]


def whole_state(group: BucketizedFlatTensors) -> str:
    states = {b.state for b in group.buckets}
    return states.pop().value if len(states) == 1 else "partial:" + ",".join(sorted(s.value for s in states))


def fill_gpu(device: torch.device) -> list[torch.Tensor]:
    """Allocates until torch.OutOfMemoryError, from 1 GiB blocks down to 2 MiB; returns the filler (keep it)."""
    filler: list[torch.Tensor] = []
    size = GiB
    while size >= 2 * MiB:
        try:
            filler.append(torch.empty(size, dtype=torch.uint8, device=device))
        except torch.OutOfMemoryError:
            size //= 2
    return filler


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release(group: BucketizedFlatTensors, pool: HostMemoryPool) -> None:
    try:
        group.onload()
        group.release_host_buffers()
    except Exception as exc:  # leave it; the report already says what failed
        print(f"  (cleanup of {group.name} failed: {exc})")


# ---- 1. OOM on onload ----

def section_oom(sec: Section, device: torch.device, pool: HostMemoryPool, gib: float) -> None:
    tensors, specs = make_tensors(gib, 1000, device)
    group = BucketizedFlatTensors(tensors, 4 * TENSOR_BYTES / MiB, name="oom_group", pool=pool)
    sec.data["group_bytes"] = group.nbytes
    sec.data["buckets"] = len(group.buckets)
    group.offload()
    torch.cuda.empty_cache()
    sec.check("offloaded", group.state is GroupState.ON_HOST and group.device_bytes == 0)
    filler = fill_gpu(device)
    sec.data["free_after_fill"] = torch.cuda.mem_get_info(device)[0]
    # leave room for a few buckets but not the group, so onload allocates some buckets before it fails and must
    # roll those back
    room = int(min(group.nbytes * 0.45, group.nbytes - max(b.nbytes for b in group.buckets)))
    freed = 0
    while filler and freed < room and filler[0].numel() == GiB:
        freed += filler.pop(0).numel()
    torch.cuda.empty_cache()
    sec.data["filler_bytes"] = sum(f.numel() for f in filler)
    sec.data["free_before_onload"] = torch.cuda.mem_get_info(device)[0]
    allocated_before = torch.cuda.memory_allocated(device)
    err: BaseException | None = None
    try:
        group.onload()
    except BaseException as exc:  # noqa: BLE001 - recorded below
        err = exc
    sec.check("raises_MemmgrOutOfMemoryError", type(err) is MemmgrOutOfMemoryError,
              f"{type(err).__name__}: {err}" if err is not None else "no error")
    if isinstance(err, MemmgrOutOfMemoryError):
        msg = str(err)
        sec.data["message"] = msg
        sec.check("error_names_group", err.group == "oom_group" and "'oom_group'" in msg)
        sec.check("error_bytes_needed", err.bytes_needed == group.nbytes and str(group.nbytes) in msg,
                  err.bytes_needed)
        sec.check("error_bytes_free", err.bytes_free is not None and err.bytes_free < group.nbytes
                  and str(err.bytes_free) in msg, err.bytes_free)
        sec.check("is_chained_from_torch_oom", isinstance(err.__cause__, torch.OutOfMemoryError))
    sec.check("nothing_half_restored", group.device_bytes == 0 and all(
        b.state is BucketState.ON_HOST and b.device_bytes == 0 for b in group.buckets),
        {"device_bytes": group.device_bytes, "states": [b.state.value for b in group.buckets]})
    sec.check("partial_allocations_rolled_back", torch.cuda.memory_allocated(device) == allocated_before,
              torch.cuda.memory_allocated(device) - allocated_before)
    sec.check("host_stores_kept", all(b.host_buffer is not None and b.host_bytes == b.nbytes for b in group.buckets))
    del filler
    torch.cuda.empty_cache()
    t = timed(group.onload)
    sec.data["retry_onload_s"] = round(t, 3)
    sec.check("retry_on_device", group.state is GroupState.ON_DEVICE and group.device_bytes == group.nbytes)
    bad = mismatches(tensors, specs, device)
    sec.check("retry_bit_exact", not bad, f"{len(bad)} tensors differ" if bad else None)
    release(group, pool)
    del tensors, group
    torch.cuda.empty_cache()


# ---- 2. interrupted async transfers ----

def build_manager(device: torch.device, pool: HostMemoryPool, n_groups: int, seed: int):
    mgr = MemoryManager(pool=pool, bucket_size_mb=TENSOR_BYTES // 2 / MiB, empty_cache=False)
    contents = {}
    for k in range(n_groups):
        # two half-size tensors per group -> two buckets, so an interruption inside a group is possible too
        specs = [(seed + 10 * k + i, TENSOR_BYTES // 2, torch.float32) for i in range(2)]
        tensors = [make_tensor(s, b, d, device) for s, b, d in specs]
        mgr.add_group(f"group{k}", {f"group{k}.t{i}": t for i, t in enumerate(tensors)}, priority=k)
        contents[f"group{k}"] = (tensors, specs)
    return mgr, contents


def all_groups(mgr: MemoryManager) -> list[BucketizedFlatTensors]:
    return [mgr.group(n) for n in mgr.group_names]


def check_whole(sec: Section, label: str, mgr: MemoryManager, expect: dict[str, str] | None = None) -> None:
    for g in all_groups(mgr):
        g.wait()
    states = {g.name: whole_state(g) for g in all_groups(mgr)}
    problems = [p for g in all_groups(mgr) for p in bucket_consistency(g)]
    sec.check(f"{label}.each_group_whole", all(not s.startswith("partial") for s in states.values()), states)
    sec.check(f"{label}.state_matches_storage", not problems, problems or None)
    if expect is not None:
        sec.check(f"{label}.expected_placement", states == expect, {"got": states, "want": expect})


def check_contents(sec: Section, label: str, mgr: MemoryManager, contents, device: torch.device) -> None:
    mgr.onload()
    bad = {n: mismatches(t, s, device) for n, (t, s) in contents.items()}
    bad = {n: b for n, b in bad.items() if b}
    sec.check(f"{label}.bit_exact_after_completing", not bad, bad or None)


def interrupt_group_method(group: BucketizedFlatTensors, method: str) -> Callable[[], None]:
    """Makes ``method`` of the group's first bucket raise KeyboardInterrupt (the manager moves buckets, not whole
    groups, so this is the moment the group's first transfer would be issued); returns the undo."""
    bucket = group.buckets[0]
    original = getattr(bucket, method)

    def boom(*args: Any, **kwargs: Any):
        raise KeyboardInterrupt(f"simulated interrupt at {group.name}.{method}")

    setattr(bucket, method, boom)
    return lambda: setattr(bucket, method, original)


def section_interrupts(sec: Section, device: torch.device, pool: HostMemoryPool, trials: int) -> None:
    mgr, contents = build_manager(device, pool, 4, 2000)
    names = mgr.group_names

    # a) KeyboardInterrupt while the manager issues non-blocking offloads, between group1 and group2
    undo = interrupt_group_method(mgr.group("group2"), "offload")
    try:
        mgr.offload(non_blocking=True)
        sec.check("a.interrupt_propagates", False, "no KeyboardInterrupt")
    except KeyboardInterrupt:
        sec.check("a.interrupt_propagates", True)
    finally:
        undo()
    check_whole(sec, "a_offload", mgr, {"group0": "on_host", "group1": "on_host", "group2": "on_device",
                                        "group3": "on_device"})
    check_contents(sec, "a_offload", mgr, contents, device)

    # b) the same while onloading
    mgr.offload()
    undo = interrupt_group_method(mgr.group("group1"), "onload")  # onload order: group3, group2, group1, group0
    try:
        mgr.onload(non_blocking=True)
        sec.check("b.interrupt_propagates", False, "no KeyboardInterrupt")
    except KeyboardInterrupt:
        sec.check("b.interrupt_propagates", True)
    finally:
        undo()
    # the manager's onload is one transaction: interrupted part-way, it undoes every group it restored
    check_whole(sec, "b_onload", mgr, {n: "on_host" for n in names})
    check_contents(sec, "b_onload", mgr, contents, device)

    # c) an exception from an after_offload hook of a non-blocking offload: every transfer was issued
    def failing_hook(event: str, groups: tuple) -> None:
        raise RuntimeError(f"hook failed at {event}")

    handle = mgr.register_hook("after_offload", failing_hook)
    try:
        mgr.offload(non_blocking=True)
        sec.check("c.hook_error_propagates", False)
    except RuntimeError as exc:
        sec.check("c.hook_error_propagates", "hook failed" in str(exc))
    finally:
        handle.remove()
    check_whole(sec, "c_hook", mgr, {n: "on_host" for n in names})
    check_contents(sec, "c_hook", mgr, contents, device)

    # d) a before_onload hook that raises: nothing moves
    mgr.offload()
    handle = mgr.register_hook("before_onload", failing_hook)
    try:
        mgr.onload(non_blocking=True)
    except RuntimeError:
        pass
    finally:
        handle.remove()
    check_whole(sec, "d_hook", mgr, {n: "on_host" for n in names})
    check_contents(sec, "d_hook", mgr, contents, device)

    # e) real asynchronous interrupts (_thread.interrupt_main) at random moments of a non-blocking offload/onload
    #    loop. A group may be left partly moved (BucketizedFlatTensors does not roll back a half-issued group), which
    #    is recorded; what must hold is that each bucket's state matches its storage and nothing is lost.
    rng = random.Random(0)
    partial, inconsistent, leaks, lost, where = 0, [], [], {}, []
    for trial in range(trials):
        delay = rng.uniform(0.0005, 0.02)
        timer = threading.Timer(delay, _thread.interrupt_main)
        ops = 0
        try:
            timer.start()
            while True:
                mgr.offload(non_blocking=True)
                mgr.onload(non_blocking=True)
                ops += 1
        except KeyboardInterrupt:
            frame = traceback.extract_tb(sys.exc_info()[2])[-1]
            where.append(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}")
        finally:
            timer.join()
        for g in all_groups(mgr):
            g.wait()
        states = {g.name: whole_state(g) for g in all_groups(mgr)}
        partial += sum(s.startswith("partial") for s in states.values())
        problems = [p for g in all_groups(mgr) for p in bucket_consistency(g, "unsafe")]
        if problems:
            inconsistent.append({"trial": trial, "states": states, "problems": problems, "where": where[-1:]})
        held = [p for g in all_groups(mgr) for p in bucket_consistency(g, "held")]
        if held:
            leaks.append({"trial": trial, "states": states, "held": held, "where": where[-1:]})
        for g in all_groups(mgr):  # complete every group, bucket by bucket where partial
            try:
                g.onload()
            except Exception as exc:  # noqa: BLE001
                inconsistent.append({"trial": trial, "recover": f"{g.name}: {type(exc).__name__}: {exc}"})
        bad = {n: mismatches(t, s, device) for n, (t, s) in contents.items()}
        bad = {n: b for n, b in bad.items() if b}
        if bad:
            lost[trial] = bad
        if problems or bad:
            # a bucket whose state disagrees with its storage must not be moved again (an offload would read freed
            # device memory): stop here, the report has the details
            break
    sec.data["e_trials_run"] = trial + 1 if trials else 0
    sec.data["e_trials"] = trials
    sec.data["e_partial_groups_seen"] = partial
    sec.data["e_interrupted_in"] = sorted(set(where))
    sec.check("e_signal.no_bucket_on_device_without_storage", not inconsistent, inconsistent or None)
    sec.check("e_signal.no_device_memory_held_while_off", not leaks, leaks or None)
    sec.check("e_signal.bit_exact_after_completing", not lost, lost or None)
    for g in all_groups(mgr):
        release(g, pool)
    del mgr, contents
    empty_cache()


# ---- 3. stream ordering ----

def sleep_cycles(seconds: float) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_hz = getattr(props, "clock_rate", 1_800_000) * 1000  # kHz -> Hz where torch reports it
    return int(seconds * clock_hz)


def section_streams(sec: Section, device: torch.device, pool: HostMemoryPool) -> None:
    tensors, specs = make_tensors(1.0, 3000, device)
    group = BucketizedFlatTensors(tensors, 256, name="streams", pool=pool)
    cycles = sleep_cycles(1.0)
    # Pin before the long kernel: registering host memory (cudaHostRegister) synchronizes the device, so a first
    # offload that pins lazily would wait for the kernel and the test would no longer race the copy against it.
    group.ensure_host_buffers()

    # a) long kernel, then the writes, then offload at once: the host store must hold the written values.
    # One write per bucket: thousands of small kernels queued behind the long one would fill the launch queue and
    # block the CPU until the long kernel ended, so the offload would no longer be issued while the stream is busy.
    index = {id(t): i for i, t in enumerate(tensors)}
    sources = []
    for b in group.buckets:
        src = torch.empty_like(b.flat)
        for _name, t, offset in b.members:
            src[offset:offset + t.numel()].fill_(index[id(t)] + 1)
        sources.append(src)
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    with torch.no_grad():
        for b, src in zip(group.buckets, sources):
            b.flat.copy_(src)
    t_issue = time.perf_counter()
    handle = group.offload(non_blocking=True)
    sec.data["offload_call_seconds"] = round(time.perf_counter() - t_issue, 4)
    issued_while_busy = not torch.cuda.current_stream().query()
    # b) the freed block must not be handed out while the copy still reads it: allocate the same size at once
    junk = [torch.empty(b.nbytes, dtype=torch.uint8, device=device).fill_(0xAB) for b in group.buckets]
    handle.wait()
    sec.check("a.offload_issued_while_stream_busy", issued_while_busy)
    del sources
    wrong = []
    for b in group.buckets:
        store = b.host_buffer.tensor.view(b.dtype)
        for name, t, offset in b.members:
            if not bool((store[offset:offset + t.numel()] == float(index[id(t)] + 1)).all()):
                wrong.append(name)
    sec.check("a.host_copy_has_final_values", not wrong, wrong or None)
    del junk
    group.onload()
    sec.check("a.restored_final_values", all(bool((t == i + 1).all()) for i, t in enumerate(tensors)))

    # c) onload followed at once by compute, no explicit sync, with junk left in the allocator's free blocks
    with torch.no_grad():
        for t, (s, b, d) in zip(tensors, specs):
            t.copy_(make_tensor(s, b, d, device))
    group.offload()
    for _ in range(2):
        scratch = torch.empty(group.nbytes, dtype=torch.uint8, device=device).fill_(0xCD)
        del scratch
    torch.cuda._sleep(cycles // 4)  # keep the stream busy so the compute below is queued behind the copies
    group.onload(non_blocking=True)
    with torch.no_grad():
        reads = [bits(t).clone() for t in tensors]  # queued on the current stream straight after onload
    bad = [i for i, (r, (s, b, d)) in enumerate(zip(reads, specs)) if not torch.equal(r, bits(make_tensor(s, b, d,
                                                                                                        device)))]
    sec.check("c.compute_after_onload_reads_restored_values", not bad, bad or None)
    del reads

    # d) offload then onload issued back to back (onload while the offload copy may still run)
    torch.cuda._sleep(cycles // 4)
    group.offload(non_blocking=True)
    group.onload(non_blocking=True)
    with torch.no_grad():
        reads = [bits(t).clone() for t in tensors]
    group.wait()
    bad = [i for i, (r, (s, b, d)) in enumerate(zip(reads, specs)) if not torch.equal(r, bits(make_tensor(s, b, d,
                                                                                                        device)))]
    sec.check("d.back_to_back_offload_onload_bit_exact", not bad, bad or None)
    sec.check("d.state_on_device", group.state is GroupState.ON_DEVICE and group.device_bytes == group.nbytes)
    release(group, pool)
    del tensors, group, reads
    torch.cuda.empty_cache()


# ---- 4. verify ----

def section_verify(sec: Section, device: torch.device, pool: HostMemoryPool, gib: float, repeats: int) -> None:
    tensors, specs = make_tensors(gib, 4000, device)
    group = BucketizedFlatTensors(tensors, 4 * TENSOR_BYTES / MiB, name="verified", pool=pool, verify=True)
    sec.data["group_bytes"] = group.nbytes
    group.offload()
    victim = group.buckets[len(group.buckets) // 2]
    store = victim.host_buffer.tensor
    pos = store.numel() // 3 + 5
    store[pos] ^= 0x01
    err: BaseException | None = None
    try:
        group.onload()
    except BaseException as exc:  # noqa: BLE001
        err = exc
    sec.check("raises_MemmgrCorruptionError", type(err) is MemmgrCorruptionError,
              f"{type(err).__name__}: {err}" if err is not None else "no error")
    if err is not None:
        msg = str(err)
        sec.data["message"] = msg
        sec.check("names_bucket_and_both_checksums", f"'{victim.name}'" in msg and msg.count("0x") >= 2)
    sec.check("left_on_host", group.state is GroupState.ON_HOST and group.device_bytes == 0,
              whole_state(group))
    store[pos] ^= 0x01
    group.onload()
    bad = mismatches(tensors, specs, device)
    sec.check("repaired_then_bit_exact", not bad, bad or None)

    # cost: blocking offload + onload of the whole group, with and without verify
    def cycle() -> tuple[float, float]:
        return timed(group.offload), timed(group.onload)  # noqa: F821 - deleted after the last use

    results = {}
    for verify in (False, True, False, True):
        group.verify = verify
        cycle()  # warm-up (weights table, allocator)
        samples = [cycle() for _ in range(repeats)]
        off = statistics.median(s[0] for s in samples)
        on = statistics.median(s[1] for s in samples)
        results[str(verify)] = {"offload_s": round(off, 4), "onload_s": round(on, 4),
                                "offload_GBps": round(group.nbytes / off / 1e9, 2),
                                "onload_GBps": round(group.nbytes / on / 1e9, 2)}
    group.verify = True
    group.offload()
    peak_extra = -1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    group.onload()
    if device.type == "cuda":
        peak_extra = torch.cuda.max_memory_allocated(device) - base - group.nbytes
    one = group.buckets[0].flat
    checksum_s = statistics.median(timed(lambda: bucket_checksum(one)) for _ in range(5))
    plain, verified = results["False"], results["True"]
    overhead = (verified["offload_s"] + verified["onload_s"]) / (plain["offload_s"] + plain["onload_s"]) - 1
    sec.data["cost"] = {"without_verify": plain, "with_verify": verified,
                        "round_trip_overhead_pct": round(100 * overhead, 1),
                        "checksum_GBps": round(one.numel() * one.element_size() / checksum_s / 1e9, 1),
                        "onload_peak_extra_bytes": int(peak_extra)}
    sec.check("bit_exact_after_timing", not mismatches(tensors, specs, device))
    group.verify = False
    release(group, pool)
    del tensors, group
    empty_cache()


# ---- driver ----

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (gets reliability.json)")
    parser.add_argument("--oom-gib", type=float, default=8.0)
    parser.add_argument("--verify-gib", type=float, default=4.0)
    parser.add_argument("--signal-trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run the interrupted_transfers and verify sections on the CPU with 1 MiB tensors "
                             "(checks the script's logic only)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": torch.__version__, "memmgr": memmgr.__version__,
                              "backend": memmgr.backend_info().describe(), "meta": lab.metadata()}
    if args.cpu_smoke:
        global TENSOR_BYTES
        TENSOR_BYTES = MiB
        device = torch.device("cpu")
        args.only = ["interrupted_transfers", "verify"]
        args.oom_gib, args.verify_gib = 4 * MiB / GiB, 4 * MiB / GiB
        report["device"] = "cpu (smoke run)"
    elif not torch.cuda.is_available():
        report["error"] = "CUDA is not available; this script needs a GPU (or --cpu-smoke)"
        lab.write_json(args.out / "reliability.json", report, indent=2)
        print(report["error"])
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        report["device"] = torch.cuda.get_device_name(device)
        report["device_total_bytes"] = torch.cuda.mem_get_info(device)[1]
    pool = HostMemoryPool(pin=False if device.type == "cpu" else None)
    sections: list[tuple[str, Callable[[Section], None]]] = [
        ("oom_onload", lambda s: section_oom(s, device, pool, args.oom_gib)),
        ("interrupted_transfers", lambda s: section_interrupts(s, device, pool, args.signal_trials)),
        ("stream_ordering", lambda s: section_streams(s, device, pool)),
        ("verify", lambda s: section_verify(s, device, pool, args.verify_gib, args.repeats)),
    ]
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, fn in sections:
        if args.only and name not in args.only:
            continue
        sec = Section(name)
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(sec)
        except BaseException as exc:  # noqa: BLE001 - a stray KeyboardInterrupt from section 2 included
            sec.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"  [ERROR] {name}: {type(exc).__name__}: {exc}", flush=True)
        sec.seconds = time.perf_counter() - t0
        results[name] = sec.to_json()
        sync()
        empty_cache()
        lab.write_json(args.out / "reliability.json", {**report, "sections": results}, indent=2)
    report["sections"] = results
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["pinned_bytes_trimmed"] = pool.trim()
    report["ok"] = all(s["ok"] for s in results.values())
    lab.write_json(args.out / "reliability.json", report, indent=2)
    print("\n== summary")
    for name, s in results.items():
        failed = [c for c, v in s["checks"].items() if not v["ok"]]
        status = "OK" if s["ok"] else ("ERROR" if s["error"] else "FAIL")
        print(f"{name:24s} {status:5s} {len(s['checks']) - len(failed)}/{len(s['checks'])} checks, "
              f"{s['seconds']:.1f}s" + (f"; failed: {failed}" if failed else ""))
    if "verify" in results and "cost" in results["verify"]["data"]:
        c = results["verify"]["data"]["cost"]
        print(f"verify cost: round trip +{c['round_trip_overhead_pct']}% (offload {c['without_verify']['offload_s']}"
              f" -> {c['with_verify']['offload_s']} s, onload {c['without_verify']['onload_s']} -> "
              f"{c['with_verify']['onload_s']} s), checksum {c['checksum_GBps']} GB/s, onload peak extra "
              f"{c['onload_peak_extra_bytes'] / MiB:.1f} MiB")
    print(f"total {report['seconds']} s -> {args.out / 'reliability.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
