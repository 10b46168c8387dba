"""The copy kernel's launch shape per device (memmgr.copy_shape): the choice rule, the environment override, the cache
keyed by device UUID, driver and kernel build, and (on a GPU) every shape copying bit-exact."""
import json
import logging

import pytest
import torch

import memmgr
from memmgr import copy_shape
from memmgr.copy_shape import BULK_CANDIDATES, CANDIDATES, DEFAULT_SHAPE, CopyShape, ShapeChoice
from memmgr.errors import MemmgrInputError

from conftest import requires_cuda

KEY = "GPU-test-uuid|driver 999.1|" + copy_shape.KERNEL_BUILD


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """A cache file of the test's own, no shape from the environment, a fixed device key, no earlier choices."""
    path = tmp_path / "shapes.json"
    monkeypatch.setenv("MEMMGR_COPY_SHAPE_CACHE", str(path))
    monkeypatch.delenv("MEMMGR_COPY_SHAPE", raising=False)
    monkeypatch.setattr(copy_shape, "device_key", lambda device: KEY)
    monkeypatch.setattr(copy_shape, "_choices", copy_shape._Choices())
    return path


def test_the_fastest_shape_wins_and_near_ties_go_to_the_fewest_bytes_in_flight():
    # 1:16 and 2:8 are within 3% of the best and equally deep: the one with fewer blocks
    assert copy_shape.choose({CopyShape(1, 4): 30.0, CopyShape(1, 16): 52.0, CopyShape(2, 8): 51.0}) == CopyShape(1, 16)
    # 1:8 is within 3% of 2:16 and half as deep
    assert copy_shape.choose({CopyShape(1, 8): 51.5, CopyShape(2, 16): 52.0, CopyShape(1, 4): 40.0}) == CopyShape(1, 8)
    # outside the tolerance the faster one wins, however deep
    assert copy_shape.choose({CopyShape(1, 4): 30.0, CopyShape(2, 16): 52.0}) == CopyShape(2, 16)
    assert copy_shape.choose({}) == DEFAULT_SHAPE


@pytest.mark.parametrize("text", ["8", "1:5", "0:4", "a:b", "1:8:2", "0:bulk", "1:bulky"])
def test_a_malformed_shape_in_the_environment_is_refused_naming_the_variable(isolated, monkeypatch, text):
    monkeypatch.setenv("MEMMGR_COPY_SHAPE", text)
    with pytest.raises(MemmgrInputError, match="MEMMGR_COPY_SHAPE|blocks per SM"):
        copy_shape._choices.get(0, measure_fn=lambda d: pytest.fail("measured although the environment set a shape"))


def test_a_bulk_shape_is_named_b_bulk_counts_its_depth_and_yields_near_ties_to_the_vector_kernel():
    bulk = CopyShape.parse("2:bulk")
    assert bulk == CopyShape(2, 0, bulk=True) and bulk.label == "2:bulk" and bulk.depth == 2 * copy_shape.BULK_DEPTH
    assert [s.label for s in BULK_CANDIDATES] == ["1:bulk", "2:bulk"]
    with pytest.raises(MemmgrInputError):
        CopyShape(1, 4, bulk=True)
    # within the tolerance the shallower vector shape wins; well ahead, the bulk one
    assert copy_shape.choose({CopyShape(1, 16): 51.0, CopyShape(1, 0, bulk=True): 52.0}) == CopyShape(1, 16)
    assert copy_shape.choose({CopyShape(1, 16): 30.0, CopyShape(1, 0, bulk=True): 52.0}).bulk
    assert ShapeChoice(bulk, "cache").as_dict()["bulk"] is True


class _FakeNative:
    def __init__(self, supported: bool) -> None:
        self.supported = supported
        self.calls: list[tuple] = []

    def bulk_kernel_supported(self, device: int) -> bool:
        return self.supported

    def bulk_kernel_copy(self, *args) -> None:
        self.calls.append(("bulk", *args))

    def kernel_copy(self, *args) -> None:
        self.calls.append(("vector", *args))


@pytest.mark.parametrize("opted_in,supported,bulk_measured", [
    (False, True, False), (True, False, False), (True, True, True)])
def test_bulk_shapes_are_measured_only_when_opted_in_and_the_device_runs_them(monkeypatch, opted_in, supported,
                                                                               bulk_measured):
    from memmgr import _native

    monkeypatch.setattr(_native, "native_module", lambda: _FakeNative(supported))
    if opted_in:
        monkeypatch.setenv("MEMMGR_COPY_KERNEL_BULK", "1")
    else:
        monkeypatch.delenv("MEMMGR_COPY_KERNEL_BULK", raising=False)
    expected = CANDIDATES + (BULK_CANDIDATES if bulk_measured else ())
    assert copy_shape.candidates_for(0) == expected


def test_a_shape_launches_its_own_kernel():
    native = _FakeNative(True)
    CopyShape(2, 0, bulk=True).launch(native, 1, 2, 3, 4, 0, 264)
    CopyShape(1, 8).launch(native, 1, 2, 3, 4, 0, 132)
    assert native.calls == [("bulk", 1, 2, 3, 4, 0, 264), ("vector", 1, 2, 3, 4, 0, 132, 8)]


def test_the_environment_sets_the_shape_without_measuring(isolated, monkeypatch):
    monkeypatch.setenv("MEMMGR_COPY_SHAPE", "2:16")
    choice = copy_shape._choices.get(0, measure_fn=lambda d: pytest.fail("measured"))
    assert choice.shape == CopyShape(2, 16) and choice.source.startswith("environment")
    assert not isolated.exists()


def test_a_measured_shape_is_cached_by_device_key_and_the_next_process_reads_it(isolated):
    calls = []

    def fake_measure(device):
        calls.append(device)
        return {s: 30.0 + s.depth for s in CANDIDATES}  # deeper is faster: 2:16 wins

    choice = copy_shape._choices.get(0, measure_fn=fake_measure)
    assert choice.shape == CopyShape(2, 16) and choice.source == "measured" and calls == [0]
    assert copy_shape._choices.get(0, measure_fn=fake_measure) is choice and calls == [0]  # once per process
    saved = json.loads(isolated.read_text())
    assert saved[KEY]["shape"] == "2:16" and set(saved[KEY]["h2d_gbps"]) == {s.label for s in CANDIDATES}
    fresh = copy_shape._Choices()  # another process: the cache, no measurement
    again = fresh.get(0, measure_fn=lambda d: pytest.fail("measured although the cache holds this device"))
    assert again.shape == CopyShape(2, 16) and again.source == "cache"


def test_another_driver_or_kernel_build_measures_again(isolated, monkeypatch):
    isolated.write_text(json.dumps({KEY.replace("999.1", "998.0"): {"shape": "2:16"}}))
    choice = copy_shape._choices.get(0, measure_fn=lambda d: {CopyShape(1, 8): 50.0})
    assert choice.shape == CopyShape(1, 8) and choice.source == "measured"
    assert set(json.loads(isolated.read_text())) == {KEY, KEY.replace("999.1", "998.0")}


def test_an_unreadable_cache_is_ignored_with_a_warning_and_rewritten(isolated, caplog):
    isolated.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="memmgr"):
        choice = copy_shape._choices.get(0, measure_fn=lambda d: {CopyShape(1, 16): 50.0})
    assert choice.shape == CopyShape(1, 16)
    assert "cannot be read" in caplog.text
    assert json.loads(isolated.read_text())[KEY]["shape"] == "1:16"


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), TypeError("out of memory in a new way")])
def test_a_failed_measurement_falls_back_to_the_default_shape_and_says_why(isolated, caplog, error):
    def failing(device):
        raise error

    with caplog.at_level(logging.WARNING, logger="memmgr"):
        choice = copy_shape._choices.get(0, measure_fn=failing)
    assert choice.shape == DEFAULT_SHAPE and "out of memory" in choice.source
    assert not isolated.exists()  # a fallback is not a measurement: the next process tries again


def test_cache_off_measures_in_every_process_and_writes_nothing(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMMGR_COPY_SHAPE_CACHE", "off")
    choice = copy_shape._choices.get(0, measure_fn=lambda d: {CopyShape(2, 8): 50.0})
    assert choice.shape == CopyShape(2, 8) and not list(tmp_path.iterdir())


def test_backend_info_reports_the_shape_of_every_device_with_its_source(isolated, monkeypatch):
    copy_shape._choices.get(0, measure_fn=lambda d: {CopyShape(1, 8): 50.0, CopyShape(1, 4): 30.0})
    from memmgr import transfer

    status = transfer.copy_paths_status()["kernel_shape"]
    assert status["cuda:0"]["shape"] == "1:8" and status["cuda:0"]["source"] == "measured"
    info = memmgr.backend_info()
    assert info.copy_kernel_shape["cuda:0"]["unroll"] == 8
    assert "copy kernel shape (blocks per SM:unroll): cuda:0 1:8 (measured)" in info.describe()
    assert ShapeChoice(CopyShape(1, 4), "cache").as_dict()["blocks_per_sm"] == 1


@requires_cuda
@pytest.mark.parametrize("shape", CANDIDATES + BULK_CANDIDATES, ids=lambda s: s.label)
def test_every_candidate_shape_copies_bit_exact_both_ways(shape):
    from memmgr._native import native_module
    from memmgr.host_memory import allocate_host_buffer

    native = native_module()
    if native is None or not hasattr(native, "kernel_copy"):
        pytest.skip("needs a CUDA GPU and memmgr's native extension")
    if shape.bulk and not native.bulk_kernel_supported(0):
        pytest.skip("the bulk variant needs compute capability 9.0 and a build for it")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    stream = torch.cuda.Stream()
    # offsets 16/32: aligned bodies after an unaligned head elsewhere; 3: no common 16-byte grid (the vector fallback)
    for nbytes, offset in ((0, 0), (1, 0), (4097, 16), ((48 << 20) + 13, 32), (3 * 4096 * 1024 * 16 + 5, 0),
                          ((5 << 20) + 7, 3), (24 * 1024 * 7 + 16, 0)):
        host = allocate_host_buffer(nbytes + offset + 64, pin=True, allow_pageable_fallback=False)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        host.tensor[offset:offset + nbytes].copy_(src)
        dev = torch.full((nbytes + 64,), 7, dtype=torch.uint8, device="cuda")
        stream.wait_stream(torch.cuda.current_stream())  # the fill runs on the current stream, the copy on `stream`
        shape.launch(native, dev.data_ptr(), host.tensor.data_ptr() + offset, nbytes, stream.cuda_stream, 0,
                     shape.blocks(sms))
        stream.synchronize()
        assert torch.equal(dev[:nbytes].cpu(), src) and bool((dev[nbytes:] == 7).all())
        back = allocate_host_buffer(nbytes + 64, pin=True, allow_pageable_fallback=False)
        back.tensor.fill_(9)
        shape.launch(native, back.tensor.data_ptr(), dev.data_ptr(), nbytes, stream.cuda_stream, 0, shape.blocks(sms))
        stream.synchronize()
        assert torch.equal(back.tensor[:nbytes], src) and bool((back.tensor[nbytes:] == 9).all())
        host.release()
        back.release()


@requires_cuda
def test_the_first_kernel_use_measures_every_candidate_on_the_device(monkeypatch, tmp_path):
    from memmgr import transfer

    if not transfer.kernels_available():
        pytest.skip("needs a CUDA GPU and memmgr's native extension")
    monkeypatch.setenv("MEMMGR_COPY_SHAPE_CACHE", str(tmp_path / "shapes.json"))
    monkeypatch.delenv("MEMMGR_COPY_SHAPE", raising=False)
    monkeypatch.setattr(copy_shape, "_choices", copy_shape._Choices())
    choice = copy_shape.shape_for(0)
    assert choice.source == "measured" and set(choice.h2d_gbps) == {s.label for s in CANDIDATES}
    assert all(g > 1.0 for g in choice.h2d_gbps.values()), choice.h2d_gbps
    assert choice.link_gbps and choice.link_gbps > 1.0 and choice.kernel_holds_link is not None
    assert choice.shape == copy_shape.choose({CopyShape.parse(k): v for k, v in choice.h2d_gbps.items()})


def test_a_bench_figure_names_its_card_name_memory_pcie_link_and_driver(monkeypatch):
    """Every GPU figure names its card (issue 30): the bench's info and table header come from nvml.card()."""
    from types import SimpleNamespace

    from memmgr import nvml

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="torch name", total_memory=80 * 2**30))
    monkeypatch.setattr(nvml, "nvml_index", lambda i: 3)
    monkeypatch.setattr(nvml, "describe_device", lambda i: {
        "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "total": 85520809984,
        "pcie": {"current_gen": 5, "current_width": 16, "max_gen": 5, "max_width": 16, "gpu_max_gen": 5}})
    monkeypatch.setattr(nvml, "driver_version", lambda: "580.65.06")
    monkeypatch.setattr(nvml, "cuda_driver_version", lambda: "13.0")
    card = nvml.card(0)
    assert card["name"] == "NVIDIA H100 80GB HBM3" and card["uuid"] == "GPU-1" and card["driver"] == "580.65.06"
    assert nvml.describe_card(card) == "NVIDIA H100 80GB HBM3, 79.6 GiB, PCIe Gen5 x16 (max Gen5 x16), driver 580.65.06"
    monkeypatch.setattr(nvml, "nvml_index", lambda i: None)  # no NVML: torch's name and memory, the rest unknown
    monkeypatch.setattr(nvml, "driver_version", lambda: None)
    assert nvml.describe_card(nvml.card(0)) == "torch name, 80.0 GiB, driver ?"


def test_a_kernel_copy_launches_with_the_devices_shape_and_blocks_given_override_only_the_grid(isolated, monkeypatch):
    """transfer's launch passes the device's chosen shape to the native kernel: its blocks per SM x the SMs and its
    unroll; a grid given by the caller (MEMMGR_KERNEL_BLOCKS, kernel_blocks=) replaces the blocks only."""
    from types import SimpleNamespace

    from memmgr import transfer

    calls, prepared = [], []
    fake = SimpleNamespace(kernel_copy=lambda *args: calls.append(args), kernel_prepare=prepared.append)
    monkeypatch.setattr(transfer, "native_module", lambda: fake)
    monkeypatch.setattr(transfer, "kernels_available", lambda: True)
    monkeypatch.setattr(transfer, "_prepared_devices", set())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setenv("MEMMGR_COPY_SHAPE", "2:8")
    dst = SimpleNamespace(data_ptr=lambda: 4096, numel=lambda: 1 << 20)
    src = SimpleNamespace(data_ptr=lambda: 8192)
    stream = SimpleNamespace(device=torch.device("cuda", 0), cuda_stream=7)
    transfer._issue_kernel(dst, src, stream, 0)
    transfer._issue_kernel(dst, src, stream, 66)
    assert prepared == [0]  # loaded (and the shape chosen) once per device
    assert calls == [(4096, 8192, 1 << 20, 7, 0, 264, 8), (4096, 8192, 1 << 20, 7, 0, 66, 8)]
    assert transfer.copy_paths_status()["kernel_shape"]["cuda:0"]["source"].startswith("environment")


@pytest.mark.parametrize("kernel,holds", [(33.4, False), (48.0, True)])
def test_the_measurement_says_whether_the_kernel_holds_the_link_and_the_cache_keeps_it(isolated, kernel, holds):
    measured = {s: kernel - s.depth * 0.01 for s in CANDIDATES} | {copy_shape.LINK_KEY: 50.0}
    choice = copy_shape._choices.get(0, measure_fn=lambda d: dict(measured))
    assert choice.link_gbps == 50.0 and choice.kernel_holds_link is holds
    assert choice.as_dict()["kernel_holds_link"] is holds
    again = copy_shape._Choices().get(0, measure_fn=lambda d: pytest.fail("measured although cached"))
    assert again.source == "cache" and again.link_gbps == 50.0 and again.kernel_holds_link is holds


def test_a_shape_without_a_link_measurement_does_not_say_whether_it_holds_the_link():
    assert ShapeChoice(DEFAULT_SHAPE, "environment").kernel_holds_link is None
    assert ShapeChoice(DEFAULT_SHAPE, "cache", "k", {"1:4": 50.0}).kernel_holds_link is None


def _faked_probes(monkeypatch, kernel_gbps: float):
    """A device whose copy kernel's shape measured ``kernel_gbps`` against a 54 GB/s link, with 'auto's probe timings
    and issues faked: returns (what was issued, the timings the probes will read)."""
    from types import SimpleNamespace

    from memmgr import transfer

    copy_shape._choices.get(0, measure_fn=lambda d: {s: kernel_gbps for s in CANDIDATES} | {copy_shape.LINK_KEY: 54.0})
    issued, timings = [], []
    monkeypatch.setattr(transfer, "AUTO_PROBE_BYTES", 1 << 20)
    monkeypatch.setattr(transfer, "_last_probe", {})
    monkeypatch.setattr(transfer, "_issue", lambda dst, src, stream, chosen, blocks:
                        issued.append((chosen, dst.numel())) or chosen)
    monkeypatch.setattr(transfer, "copy_stream", lambda device, name: SimpleNamespace(wait_stream=lambda s: None))

    def timed(stream, *issues):
        for issue in issues:
            issue()
        return [(1 << 20) / (timings.pop(0) * 1e9) for _ in issues]

    monkeypatch.setattr(transfer, "_timed", timed)
    return issued, timings


@pytest.fixture
def slow_kernel_device(isolated, monkeypatch):
    """The H100: the kernel at 33 GB/s against a 54 GB/s link."""
    return _faked_probes(monkeypatch, 33.0)


def test_where_the_kernel_holds_the_link_auto_probes_engines_against_kernel_and_keeps_the_faster(
        isolated, monkeypatch):
    from memmgr import transfer

    issued, timings = _faked_probes(monkeypatch, 51.0)  # the H200
    monkeypatch.setattr(transfer, "AUTO_PROBE_MIN_BYTES", 2 << 20)
    timings.extend([28.0, 50.0])  # engines right after a release; the kernel
    assert _auto_h2d() == "kernel"
    assert issued == [("engine", 1 << 20), ("kernel", 1 << 20), ("kernel", 6 << 20)]
    assert transfer._last_probe[0]["verdict"] == "kernel"
    issued.clear()
    timings.extend([50.0, 51.0])  # free engines: the kernel is not 1.3x faster
    assert _auto_h2d() == "engine" and issued[-1] == ("engine", 6 << 20)


def _auto_h2d(nbytes: int = 8 << 20, idle: bool = True) -> str:
    from types import SimpleNamespace

    from memmgr import transfer

    stream = SimpleNamespace(device=torch.device("cuda", 0), query=lambda: idle, wait_stream=lambda s: None)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    return transfer._issue_auto_probed(buf, buf, stream, "h2d", 0, transfer.CopyPolicy().probe(nbytes))


def test_where_the_kernel_cannot_hold_the_link_healthy_engines_move_the_copy_alone(slow_kernel_device):
    issued, timings = slow_kernel_device
    timings.append(50.0)  # the engines' probe: above 0.8 x 54
    assert _auto_h2d() == "engine"
    assert issued == [("engine", 1 << 20), ("engine", 7 << 20)]  # no split probe


def test_where_the_kernel_cannot_hold_the_link_slow_engines_get_the_kernel_beside_them_if_that_is_faster(
        slow_kernel_device):
    from memmgr import transfer

    issued, timings = slow_kernel_device
    timings.extend([27.0, 45.0])  # engines after a release; both at once
    assert _auto_h2d() == "split"
    probe = transfer._last_probe[0]
    assert probe["verdict"] == "split" and probe["fraction"] == pytest.approx(27 / 60)
    # the engines' probe, the split probe (engines then kernel), then the rest split the same way
    assert [c for c, _ in issued] == ["engine", "engine", "kernel", "engine", "kernel"]
    cut = int((6 << 20) * 27 / 60) // 4096 * 4096
    assert issued[3:] == [("engine", cut), ("kernel", (6 << 20) - cut)]
    issued.clear()
    assert _auto_h2d(idle=False) == "split"  # queued behind work: the last verdict, no probe
    assert [c for c, _ in issued] == ["engine", "kernel"]
    assert "auto, last probe" in transfer.copy_paths_status()["last"]["h2d"]


def test_where_the_kernel_cannot_hold_the_link_a_split_no_faster_than_slow_engines_is_not_kept(slow_kernel_device):
    issued, timings = slow_kernel_device
    timings.extend([27.0, 29.0])  # both at once within the margin of the engines alone
    assert _auto_h2d() == "engine"
    assert issued[-1] == ("engine", 6 << 20)


@requires_cuda
def test_a_candidate_whose_copy_does_not_arrive_intact_is_left_out_of_the_measurement(caplog):
    from memmgr import transfer

    if not transfer.kernels_available():
        pytest.skip("needs a CUDA GPU and memmgr's native extension")

    class CopiesNothing:
        label, depth, bulk = "broken", 1, False

        def blocks(self, sm_count: int) -> int:
            return sm_count

        def launch(self, *args) -> None:
            pass

    broken = CopiesNothing()
    with caplog.at_level(logging.WARNING, logger="memmgr"):
        speeds = copy_shape.measure(0, nbytes=8 << 20, repeats=1, candidates=(CopyShape(1, 4), broken))
    assert set(speeds) == {CopyShape(1, 4), copy_shape.LINK_KEY}
    assert "shape broken did not copy" in caplog.text
