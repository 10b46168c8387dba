"""Managers built with ``same_address=True`` on a GPU: every managed tensor keeps its ``data_ptr()`` through offloads
and onloads while the physical memory goes back to the driver in between (another process can take it), so a
training step captured as one CUDA graph replays after any number of cycles and trains equal to the same graph never
offloaded. Skipped without CUDA (the refusals without it are in tests/test_same_address.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import memmgr

from conftest import capture_forward, skip_without_same_address

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIB = 1 << 20
# offload/onload cycles of the captured training step (benchmarks/run.py's same-address suite runs 100)
CYCLES = int(os.environ.get("MEMMGR_SAME_ADDRESS_CYCLES", 20))
# Another process that takes (nearly) all free GPU memory and gives it back, on command: "take [MiB]" leaves that much
# free (default 512) and answers the bytes it holds, "release" answers 0.
HOG = r"""
import sys, torch
held = None
# the fill kernel loads now (CUDA loads kernels lazily, into device memory): later, "take 4" leaves too little for it
torch.zeros(1 << 20, dtype=torch.uint8, device="cuda").fill_(0xAB)
torch.cuda.synchronize()
for line in sys.stdin:
    if line.split()[:1] == ["take"]:
        leave = int(line.split()[1]) if len(line.split()) > 1 else 512
        free, _ = torch.cuda.mem_get_info()
        for step in range(64):  # the allocator rounds up and the driver needs room of its own: a little less each try
            try:
                held = torch.empty(max(0, free - ((leave + 2 * step) << 20)), dtype=torch.uint8, device="cuda")
                break
            except torch.OutOfMemoryError:
                continue
        held.fill_(0xAB)
        torch.cuda.synchronize()
        print(held.numel(), flush=True)
    elif line.strip() == "release":
        held = None
        torch.cuda.empty_cache()
        print(0, flush=True)
    else:
        break
"""


@pytest.fixture(autouse=True)
def _needs_vmm():
    skip_without_same_address()


@pytest.fixture
def hog():
    proc = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def command(what: str) -> int:
        proc.stdin.write(what + "\n")
        proc.stdin.flush()
        return int(proc.stdout.readline())

    yield command
    proc.stdin.close()
    proc.wait(timeout=60)


def _model(seed: int = 0, width: int = 2048) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)).cuda()


def _addresses(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[int]:
    """Where every CUDA parameter and optimizer tensor lives (Adam's CPU step counters are in a CPU bucket, whose
    memory is the host's)."""
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_cuda]
    return [p.data_ptr() for p in model.parameters()] + [t.data_ptr() for t in state]


def _warm_up(model, opt, x, y) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # as torch asks before a capture; creates the optimizer's state
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)


def _capture(model, opt, x, y) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return graph, loss


def test_managed_tensors_keep_their_addresses_and_contents_and_the_memory_goes_back_to_the_driver():
    from memmgr._native import native_module

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2048, device="cuda")).sum().backward()
    opt.step()
    with memmgr.for_module(model, opt, same_address=True) as mgr:
        addresses = _addresses(model, opt)
        expected = [t.detach().clone() for t in list(model.parameters()) + [
            v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]]
        on_gpu = [b for name in ("weights", "optimizer_states") for b in mgr.group(name).buckets
                  if b.device.type == "cuda"]
        managed = sum(b.nbytes for b in on_gpu)
        assert on_gpu and all(b.same_address for b in on_gpu)
        mapped = native_module().vmm_bytes()[1]
        for _ in range(5):
            free_before = torch.cuda.mem_get_info()[0]
            mgr.offload()
            assert native_module().vmm_bytes()[1] <= mapped - managed  # every bucket's range released
            assert torch.cuda.mem_get_info()[0] - free_before >= managed - 64 * MIB
            mgr.onload()
            assert _addresses(model, opt) == addresses
        actual = list(model.parameters()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_a_captured_training_step_replays_bit_exact_after_offloads_while_another_process_takes_the_memory(hog):
    x, y = torch.randn(64, 2048, device="cuda"), torch.randn(64, 2048, device="cuda")
    twin, managed = _model(), _model()
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True)
    opt = torch.optim.Adam(managed.parameters(), lr=1e-3, capturable=True)
    _warm_up(twin, twin_opt, x, y)
    _warm_up(managed, opt, x, y)
    twin_graph, twin_loss = _capture(twin, twin_opt, x, y)
    # built before the capture: coalescing gives each tensor its lasting address, which the graph then records
    mgr = memmgr.for_module(managed, opt, same_address=True)
    graph, loss = _capture(managed, opt, x, y)
    addresses = _addresses(managed, opt)
    mgr.offload()  # one cycle first: what a first move sets up once (host memory, copy paths) is in both readings
    mgr.onload()
    torch.cuda.synchronize()
    took_on_device = hog("take")
    hog("release")
    moved = sum(b.nbytes for name in ("weights", "optimizer_states") for b in mgr.group(name).buckets)
    for cycle in range(CYCLES):
        twin_graph.replay()
        graph.replay()
        assert torch.equal(loss, twin_loss), cycle
        free_before = torch.cuda.mem_get_info()[0]
        mgr.offload()
        free_after = torch.cuda.mem_get_info()[0]
        took = hog("take")  # another process takes the freed memory, writes it, and gives it back
        assert took - took_on_device >= moved - 64 * MIB, (
            f"cycle {cycle}: the other process took {took - took_on_device} more bytes than with the state on the "
            f"device, {moved} were offloaded; free here before/after the offload {free_before}/{free_after}, "
            f"reserved {torch.cuda.memory_reserved()}")
        hog("release")
        mgr.onload()
        assert _addresses(managed, opt) == addresses, cycle
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(managed.parameters(), twin.parameters()))
    mgr.close()


def test_an_onload_without_room_raises_and_the_next_one_restores_at_the_same_address(hog):
    model = _model(width=1024)
    mgr = memmgr.for_module(model, same_address=True)
    expected = [p.detach().clone() for p in model.parameters()]
    addresses = [p.data_ptr() for p in model.parameters()]
    mgr.offload()
    torch.cuda.empty_cache()  # no unused cached blocks here: the onload's retry after emptying the cache finds none
    hog("take 4")  # about 4 MiB left: less than the 8 MiB bucket
    assert torch.cuda.mem_get_info()[0] < 8 * MIB
    with pytest.raises(memmgr.MemmgrOutOfMemoryError):
        mgr.onload()
    assert mgr.state["weights"].state == "on_host"
    hog("release")
    mgr.onload()
    assert [p.data_ptr() for p in model.parameters()] == addresses
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    mgr.close()


def test_a_non_blocking_offload_releases_each_bucket_once_its_copy_completed():
    from memmgr._native import native_module

    model = _model(width=1024)
    mgr = memmgr.for_module(model, same_address=True, bucket_size_mb=2)
    buckets = mgr.group("weights").buckets
    assert len(buckets) >= 2
    mapped = native_module().vmm_bytes()[1]
    handle = mgr.offload(non_blocking=True)
    handle.wait()
    assert native_module().vmm_bytes()[1] <= mapped - sum(b.nbytes for b in buckets)
    mgr.onload()
    mgr.close()


def test_adopted_buffers_move_into_same_address_memory_once_and_their_views_follow():
    flat = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    views = [flat[: 1 << 19].view(512, 1024), flat[1 << 19:]]
    mgr = memmgr.MemoryManager(same_address=True)
    mgr.add_group("buffers", [flat], adopt=True)
    addresses = [flat.data_ptr()] + [v.data_ptr() for v in views]
    assert views[1].data_ptr() - flat.data_ptr() == (1 << 19) * 4  # the views follow the storage's new memory
    for _ in range(3):
        mgr.offload()
        mgr.onload()
        assert [flat.data_ptr()] + [v.data_ptr() for v in views] == addresses
    assert torch.equal(flat, torch.arange(1 << 20, dtype=torch.float32, device="cuda"))
    mgr.close()


def test_the_guard_refuses_a_same_address_tensor_while_offloaded():
    model = _model(width=256)
    with memmgr.for_module(model, same_address=True, guard_offloaded=True) as mgr:
        mgr.offload()
        with pytest.raises(memmgr.MemmgrStateError, match="offloaded"):
            model(torch.randn(2, 256, device="cuda"))
        mgr.onload()
        assert model(torch.randn(2, 256, device="cuda")).shape == (2, 256)


def test_the_ledger_counts_same_address_buckets_as_managed_memory_outside_pytorchs_allocator(tmp_path):
    from memmgr.ledger import Ledger

    model = _model(width=2048)
    with memmgr.for_module(model, same_address=True) as mgr:
        ledger = Ledger(tmp_path / "ledger.jsonl")
        ledger.track(mgr, "trainer")
        (gpu,) = ledger.snapshot("on device")["gpus"]
        weights = mgr.group("weights").nbytes
        assert gpu["managed_same_address"] == weights
        assert gpu["categories"]["managed"] >= weights  # not clamped to PyTorch's allocated
        mgr.offload()
        (gpu,) = ledger.snapshot("offloaded")["gpus"]
        assert "managed_same_address" not in gpu and gpu["categories"]["managed"] == 0


def test_a_group_of_empty_tensors_moves_without_same_address_memory():
    empty = [torch.empty(0, device="cuda"), torch.empty(0, 3, device="cuda")]
    mgr = memmgr.MemoryManager(same_address=True)
    group = mgr.add_group("empty", empty)
    assert not any(b.same_address for b in group.buckets)  # nothing to keep an address for
    mgr.offload()
    mgr.onload()
    mgr.close()


def test_the_vllm_sleep_backend_suspends_and_resumes_a_captured_model_over_memmgrs_memory(hog, tmp_path):
    """The engine stand-in of issue 33: a transformers model whose forward step is a captured CUDA graph, its weights
    and a KV-cache stand-in in memmgr's same-address memory, suspended (level 1: weights kept, KV cache discarded)
    and resumed through vLLM's sleep-backend object over and over while another process takes the freed memory;
    the graph's tokens and logits stay those of the first replay."""
    pytest.importorskip("vllm.device_allocator.sleep_mode_backend")
    pytest.importorskip("transformers")
    from memmgr.sync.engines.vllm.sleep import MemmgrSleepBackend, SameAddressPhysicalMemory
    from memmgr.tools import vllm_models as vs

    model = vs.build_tiny_model(str(tmp_path), hidden=256, layers=4).to("cuda")
    memory = SameAddressPhysicalMemory()
    for tensor in list(model.parameters()) + list(model.buffers()):
        memory.add(tensor, "weights")
    kv = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    memory.add(kv, "kv_cache")
    ids = torch.tensor([list(vs.PROMPTS[0])], device="cuda")
    graph, logits, expected = capture_forward(model, ids)
    ptrs = [t.data_ptr() for t in model.parameters()] + [kv.data_ptr()]
    backend = MemmgrSleepBackend(memory=memory)
    held = sum(a.nbytes for a in memory.allocations())
    for cycle in range(CYCLES):
        torch.cuda.synchronize()
        free_awake = torch.cuda.mem_get_info()[0]
        backend.suspend(1)
        assert backend.state() == "SUSPENDED" and backend.status()["kv_cache"]["discarded"] == kv.numel()
        assert torch.cuda.mem_get_info()[0] - free_awake >= held - (64 << 20), cycle
        hog("take")
        hog("release")
        backend.resume()
        assert backend.state() == "RUNNING"
        assert [t.data_ptr() for t in model.parameters()] + [kv.data_ptr()] == ptrs, cycle
        logits.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(logits, expected), cycle
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_backend_info_says_same_address_memory_is_available():
    assert memmgr.backend_info().same_address == "available"
    assert "same-address memory available" in memmgr.backend_info().describe()


def test_a_megatron_gpt_forward_and_backward_captured_by_hand_replay_after_same_address_offloads(tmp_path):
    """issue 33's megatron case, with megatron's forward and backward captured by hand as one CUDA graph (megatron's
    own CUDA graphs need Transformer Engine, which the GPU machine's megatron-core runs without): a managed GPT and
    its unmanaged twin replay their graphs, sync grads and step; the managed one goes through an offload and an
    onload after every step, keeps every parameter's and grad buffer's address and stays equal to the twin bit for
    bit."""
    pytest.importorskip("megatron.core")
    # in a process of its own: a capture that fails leaves the process's allocator and RNG in capture mode, which
    # would fail every later test; and megatron's parallel state is per process
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_same_address_gpu as t; "
            f"t.megatron_hand_capture({str(tmp_path)!r}, {min(CYCLES, 20)})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "megatron hand capture: PASS" in proc.stdout, \
        f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def megatron_hand_capture(tmp_path: str, cycles: int) -> None:
    """The body of the megatron hand-capture test, run in a process of its own."""
    from megatron.core import parallel_state, tensor_parallel

    from memmgr.tools.megatron_models import build_gpt

    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        # megatron's attention forks its model-parallel RNG state even at dropout 0, and reading a CUDA RNG state is
        # refused inside a capture: the inference tracker's fork does nothing (the model has no dropout)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, 256, (4, 32), generator=g).cuda()
        labels = torch.randint(0, 256, (4, 32), generator=g).cuda()
        positions = torch.arange(32, device="cuda").unsqueeze(0).expand(4, -1)

        def build():
            return build_gpt(layers=2, hidden=128, heads=4, vocab=256, seq=32, cpu_init=True, seed=0, lr=1e-3)

        def forward_backward(ddp):
            # a loss on the logits: megatron's vocab-parallel cross entropy all-reduces over the tensor-parallel group
            # even at one rank, a collective the hand capture need not take in
            logits = ddp(tokens, positions, None).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            return loss

        def finish_step(ddp, opt):
            ddp.finish_grad_sync()
            opt.step()
            ddp.zero_grad_buffer()

        # built, warmed up and captured on one stream: megatron's DDP keeps each parameter's gradient accumulation
        # node, which records the stream it was made on, and a backward captured on another stream would make the
        # capture wait on that one (refused during a capture)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            models = [build(), build()]  # (twin, managed), the same weights
            for ddp, opt in models:  # warm-up steps: megatron's caches and the optimizer's state exist after them
                for _ in range(2):
                    forward_backward(ddp)
                    finish_step(ddp, opt)
        torch.cuda.current_stream().wait_stream(side)
        (twin, twin_opt), (managed, opt) = models
        mgr = memmgr.for_megatron([managed], opt, same_address=True)
        mgr.offload()  # collects the optimizer state the warm-up created, then every address is the lasting one
        mgr.onload()
        graphs = []
        for ddp, _ in models:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                loss = forward_backward(ddp)
            graphs.append((graph, loss))
        addresses = [p.data_ptr() for p in managed.parameters()] + [p.main_grad.data_ptr()
                                                                     for p in managed.parameters()]
        for cycle in range(cycles):
            for (graph, _), (ddp, o) in zip(graphs, models):
                graph.replay()
                finish_step(ddp, o)
            assert torch.equal(graphs[0][1], graphs[1][1]), cycle
            mgr.offload()
            mgr.onload()
            assert [p.data_ptr() for p in managed.parameters()] + [p.main_grad.data_ptr()
                                                                    for p in managed.parameters()] == addresses
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(managed.parameters(), twin.parameters()))
        mgr.close()
        print("megatron hand capture: PASS", flush=True)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_a_blocking_offload_returns_with_a_discarded_buckets_memory_back_with_the_driver():
    from memmgr._native import native_module

    kept, scratch = torch.randn(4 << 20, device="cuda"), torch.randn(8 << 20, device="cuda")
    mgr = memmgr.MemoryManager(same_address=True)
    mgr.add_group("kept", [kept])
    mgr.add_group("scratch", [scratch], policy="discard")
    address = scratch.data_ptr()
    torch.cuda.synchronize()
    mapped = native_module().vmm_bytes()[1]
    scratch.mul_(2)  # work on the current stream that the release must wait for
    mgr.offload()  # the groups offload their buckets non-blocking and wait for them together
    assert native_module().vmm_bytes()[1] <= mapped - (4 + 8) * 4 * MIB
    mgr.onload()
    assert scratch.data_ptr() == address and not scratch.any()  # a discarded bucket comes back zeroed
    mgr.close()


def test_a_closed_managers_tensors_free_and_grow_again_through_pytorchs_allocator():
    model = _model(width=512)
    mgr = memmgr.for_module(model, same_address=True)
    mgr.offload()
    mgr.onload()
    expected = [p.detach().clone() for p in model.parameters()]
    mgr.close()  # the buckets stop managing the storage; it keeps its memory until freed
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    storage = next(model.parameters()).untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)  # gives the same-address memory back
    storage.resize_(nbytes)  # allocates from PyTorch's cache: the range is no longer the storage's allocator
    torch.cuda.synchronize()
    assert storage.nbytes() == nbytes and torch.cuda.memory_allocated() >= nbytes
