import os
import re

import pytest
import torch

from memmgr.tools.cpu_math import warm_up_vml

warm_up_vml()  # before any test compares two computations bit for bit (memmgr.tools.cpu_math)

CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# Tests by cost (issue 31): every test is exactly one of `unit` (fast, in-process; `-m unit` runs them alone),
# `integration` (starts a vLLM engine, spawns processes or multi-rank gloo runs, runs examples/ or the stateful machine
# in subprocesses, builds megatron models, or otherwise takes more than about 2 s) and `gpu` (needs CUDA; `-m gpu`).
# A file whose tests are all integration says so with a module-level `pytestmark`; the integration tests of a file
# that also holds unit or gpu tests are named here (None: every test of the file not marked gpu).
COST_MARKS = ("unit", "integration", "gpu")
INTEGRATION_TESTS: dict[str, tuple[str, ...] | None] = {
    "test_examples.py": None,  # each runs a program of examples/ in a subprocess
    "test_send_weight_source.py": ("test_vllms_own_module_source_goes_through_a_memmgr_transport",),  # imports vLLM
    "test_comms.py": ("test_native_suspend_and_resume_are_called_and_collectives_work_after",
                      "test_fallback_destroys_and_recreates_through_the_factory"),  # two spawned gloo ranks
    # a fresh interpreter each
    "test_misuse_workflows.py": ("test_deepcopy_and_pickle_of_offloaded_tensors_read_the_host_copy_in_a_subprocess",
                                 "test_copying_a_tensor_without_memory_raises_and_a_discarded_one_reads_zeros_in_a_subprocess",
                                 "test_two_groups_adopting_one_storage_then_offloading_cannot_crash_in_a_subprocess",
                                 "test_manager_dropped_while_offloaded_gives_the_tensors_their_contents_back_in_a_subprocess"),
    "test_sync.py": ("test_sync_is_bit_exact_for_mixed_dtypes_over_several_buckets",
                     "test_every_sync_sends_its_plan_then_one_broadcast_per_bucket",
                     "test_a_receiver_built_afresh_takes_part_in_the_next_sync",
                     "test_another_set_of_weights_syncs_with_its_own_plan",
                     "test_engine_mismatch_errors_name_the_tensor_and_both_shapes",
                     "test_load_weights_error_names_tensor_shapes_and_mapping",
                     "test_manager_source_fires_hooks_in_order_and_offloads_again",
                     "test_manager_weights_offloaded_again_when_sync_raises",
                     "test_discarded_weights_raise_on_sender_and_abort_receiver",
                     "test_same_gpu_is_refused_with_placement_advice",
                     "test_sync_over_default_process_group"),  # the spawned pair of ranks of the `results` fixture
    "test_sync_atomicity.py": (
        "test_failed_vllm_sync_leaves_the_engine_generating_exactly_as_before_and_the_next_sync_works",
        "test_vllm_sync_with_atomic_off_marks_the_engine_not_consistent_until_a_sync_commits"),
}


NEEDS_GPU_REASON = re.compile(r"needs (a|2|two) (CUDA )?GPU|needs a CUDA")


def skip_without_same_address() -> None:
    """Skips a test that needs same-address memory where this machine cannot hold it; with
    MEMMGR_REQUIRE_SAME_ADDRESS=1 (benchmarks/run.py sets it on the GPU) fails instead, so that a GPU run whose native
    extension did not build cannot pass by skipping everything."""
    from memmgr.same_address import same_address_support

    supported, why = same_address_support()
    if supported:
        return
    if os.environ.get("MEMMGR_REQUIRE_SAME_ADDRESS") == "1":
        pytest.fail(f"MEMMGR_REQUIRE_SAME_ADDRESS=1 but there is no same-address memory here: {why}")
    pytest.skip(f"no same-address memory here: {why}")


def _needs_cuda(item) -> bool:
    """A test skipped without CUDA (``requires_cuda`` or its reason) or a ``[cuda]`` variant of a device-parametrized
    test: `-m gpu` selects these too, so the GPU runs need no name matching."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(value) for value in callspec.params.values()):
        return True
    return any(NEEDS_GPU_REASON.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def _is_cuda(value) -> bool:
    return value == "cuda" or (isinstance(value, torch.device) and value.type == "cuda")


@pytest.hookimpl(tryfirst=True)  # ahead of -m's deselection
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is None and _needs_cuda(item):
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu") is not None:
            continue
        names = INTEGRATION_TESTS.get(item.path.name, ())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


def devices():
    return ["cpu", "cuda"] if CUDA else ["cpu"]


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


def random_tensor(shape, dtype, device, generator=None):
    """Random contents for any dtype, including bool and float8 (generated as bytes, so every bit pattern occurs)."""
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.bool:
        return (torch.randint(0, 2, shape, generator=generator) == 1).to(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    t = raw.view(dtype).reshape(shape)
    if dtype.is_floating_point:
        # NaN payloads compare unequal; bit-exactness is checked on the bytes anyway, but keep values finite
        t = torch.where(torch.isfinite(t.float()), t, torch.zeros((), dtype=dtype))
    return t.to(device).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = a.detach().contiguous().cpu()
    b = b.detach().contiguous().cpu()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def tensors_to_bytes(tensors: dict) -> bytes:
    """Serialized for a multiprocessing queue: a tensor put on a torch.multiprocessing queue travels as a handle to
    the sender's shared memory, which is gone once a sender that exits right after putting it has exited."""
    import io

    buf = io.BytesIO()
    torch.save({n: t.detach().cpu() for n, t in tensors.items()}, buf)
    return buf.getvalue()


def tensors_from_bytes(data: bytes) -> dict:
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def write_cpu_ledger(tmp_path) -> str:
    """A ledger file of a small CPU manager (a snapshot, an offload, an onload) for the report's tests."""
    import memmgr
    from memmgr.ledger import Ledger

    mgr = memmgr.for_module(torch.nn.Linear(8, 8))
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.attach(mgr, "actor")
    ledger.snapshot("start")
    mgr.offload()
    mgr.onload()
    ledger.close()
    mgr.close()
    return str(ledger.path)


def capture_forward(model, ids: torch.Tensor):
    """A transformers model's forward on ``ids`` captured as one CUDA graph (warmed up on a side stream first, as torch
    asks): (graph, its logits tensor, the logits of its first replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        logits = model(ids, use_cache=False).logits
    graph.replay()
    return graph, logits, logits.clone()
