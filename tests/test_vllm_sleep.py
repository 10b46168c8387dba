"""memmgr's vLLM sleep-mode backend on the CPU: the ``vllm.general_plugins`` entry point is declared and registers
``"memmgr"`` with vLLM's factory (through vLLM's own plugin loader), and the backend's state machine (suspend levels,
resume tags, discard, idempotency, refusals, failures) runs over a CPU stand-in for the physical-memory layer. The
same backend over vLLM's CuMemAllocator needs CUDA: tests/test_vllm_sleep_gpu.py."""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pathlib
import tomllib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.device_allocator.sleep_mode_backend import CuMemBackend, SleepModeBackendFactory  # noqa: E402

from memmgr.errors import MemmgrInputError, MemmgrOutOfMemoryError, MemmgrStateError  # noqa: E402
from memmgr.host_memory import HostMemoryPool  # noqa: E402
from memmgr.sync.engines.vllm import registry  # noqa: E402
from memmgr.sync.engines.vllm.sleep import Allocation, MemmgrSleepBackend, use_memmgr_sleep_backend  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY_POINT = "memmgr.sync.engines.vllm.registry:register_sleep_backend"


class StandInMemory:
    """Allocations as CPU byte tensors at fixed addresses. ``release`` drops an allocation's bytes (reading it then
    raises), ``map`` gives it new bytes filled with 0xAB (the device's undefined contents); ``log`` records every
    operation in order."""

    def __init__(self) -> None:
        self.tags: dict[int, str] = {}
        self.bytes: dict[int, torch.Tensor | None] = {}
        self.log: list[tuple[str, int]] = []
        self.fail_map_at: int | None = None  # the n-th map (from 0) raises out of memory
        self.fail_copy_out = False
        self._sizes: dict[int, int] = {}
        self._maps = 0
        self._next = 1 << 20

    def add(self, tag: str, nbytes: int, seed: int) -> int:
        address, self._next = self._next, self._next + (nbytes + 4095) // 4096 * 4096
        g = torch.Generator().manual_seed(seed)
        self.tags[address] = tag
        self.bytes[address] = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
        return address

    def free(self, address: int) -> None:
        del self.tags[address], self.bytes[address]

    def read(self, address: int) -> torch.Tensor:
        data = self.bytes[address]
        if data is None:
            raise RuntimeError(f"illegal address {address:#x}: released")
        return data

    @property
    def held(self) -> int:
        return sum(t.numel() for t in self.bytes.values() if t is not None)

    def allocations(self) -> list[Allocation]:
        return [Allocation(a, int(self.bytes[a].numel()) if self.bytes[a] is not None else self._size(a), self.tags[a])
                for a in self.tags]

    def _size(self, address: int) -> int:
        return self._sizes[address]

    def copy_out(self, allocation: Allocation, host: torch.Tensor) -> int:
        if self.fail_copy_out:
            raise RuntimeError("stand-in: copy failed")
        host.copy_(self.read(allocation.address))
        self.log.append(("copy_out", allocation.address))
        return allocation.address

    def wait(self, token: int) -> None:
        self.log.append(("wait", token))

    def release(self, allocation: Allocation) -> None:
        data = self.read(allocation.address)
        self._sizes[allocation.address] = data.numel()
        self.bytes[allocation.address] = None
        self.log.append(("release", allocation.address))

    def map(self, allocation: Allocation) -> None:
        assert self.bytes[allocation.address] is None, "mapped twice"
        if self.fail_map_at is not None and self._maps == self.fail_map_at:
            self._maps += 1
            raise MemmgrOutOfMemoryError("stand-in: no room", group=allocation.tag, bytes_needed=allocation.nbytes,
                                         bytes_free=0)
        self._maps += 1
        self.bytes[allocation.address] = torch.full((allocation.nbytes,), 0xAB, dtype=torch.uint8)
        self.log.append(("map", allocation.address))

    def copy_in(self, allocation: Allocation, host: torch.Tensor) -> None:
        self.read(allocation.address).copy_(host)
        self.log.append(("copy_in", allocation.address))

    def synchronize(self) -> None:
        self.log.append(("synchronize", 0))


@pytest.fixture
def engine():
    memory = StandInMemory()
    addresses = {tag: memory.add(tag, n, seed) for seed, (tag, n) in
                 enumerate([("weights", 5000), ("kv_cache", 3000), ("runtime", 700), ("default", 300)])}
    addresses["weights2"] = memory.add("weights", 4096, 9)
    originals = {a: memory.read(a).clone() for a in memory.tags}
    backend = MemmgrSleepBackend(memory, pool=HostMemoryPool(pin=False))
    return backend, memory, addresses, originals


# ---- registration ----

def test_pyproject_declares_the_vllm_general_plugins_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"memmgr": ENTRY_POINT}
    module, name = ENTRY_POINT.split(":")
    assert getattr(importlib.import_module(module), name) is registry.register_sleep_backend


def test_the_plugin_function_registers_the_backend_with_vllms_factory_and_is_idempotent():
    registry.register_sleep_backend()
    registry.register_sleep_backend()  # vLLM loads plugins in every process, possibly more than once
    assert SleepModeBackendFactory.get_backend_class("memmgr") is MemmgrSleepBackend


def test_vllms_plugin_loader_runs_the_declared_entry_point(monkeypatch):
    import vllm.plugins as plugins

    calls = []
    monkeypatch.setattr(registry, "register_sleep_backend", lambda: calls.append("called"))
    point = importlib.metadata.EntryPoint("memmgr", ENTRY_POINT, "vllm.general_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [point] if group == "vllm.general_plugins" else [])
    monkeypatch.setattr(plugins, "plugins_loaded", False)
    plugins.load_general_plugins()
    assert calls == ["called"]


def test_vllm_refuses_to_create_the_backend_where_it_is_not_supported():
    if MemmgrSleepBackend.is_supported():
        pytest.skip("this machine supports the backend")
    registry.register_sleep_backend()
    with pytest.raises(ValueError, match="'memmgr' is not supported on this platform"):
        SleepModeBackendFactory.create_backend(SimpleNamespace(sleep_mode_backend="memmgr"))


def test_vllms_cpu_platform_has_no_sleep_mode():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks vLLM's CPU platform")
    assert not current_platform.is_sleep_mode_available()  # enable_sleep_mode=True is refused by vLLM on the CPU


# ---- the state machine ----

def test_level_1_keeps_weights_and_runtime_discards_the_kv_cache_and_resume_restores_bit_exact(engine):
    backend, memory, addresses, originals = engine
    assert backend.state() == "RUNNING"
    backend.suspend(1)
    assert backend.state() == "SUSPENDED" and memory.held == 0
    status = backend.status()
    assert status["weights"] == {"mapped": 0, "kept": 9096, "discarded": 0}
    assert status["kv_cache"] == {"mapped": 0, "kept": 0, "discarded": 3000}
    assert status["runtime"]["kept"] == 700 and status["default"]["discarded"] == 300
    backend.resume()
    assert backend.state() == "RUNNING"
    for tag in ("weights", "weights2", "runtime"):
        assert torch.equal(memory.read(addresses[tag]), originals[addresses[tag]]), tag
    assert set(memory.tags) == set(originals)  # same addresses


def test_each_allocation_is_released_after_its_own_copy_completed(engine):
    backend, memory, addresses, _ = engine
    backend.suspend(1)
    log = memory.log
    for tag in ("weights", "weights2", "runtime"):
        a = addresses[tag]
        assert log.index(("copy_out", a)) < log.index(("wait", a)) < log.index(("release", a))
    copies = [i for i, (op, _) in enumerate(log) if op == "copy_out"]
    releases_kept = [log.index(("release", addresses[t])) for t in ("weights", "weights2", "runtime")]
    assert max(copies) < min(releases_kept)  # every copy is issued before the first wait
    assert ("copy_out", addresses["kv_cache"]) not in log and ("release", addresses["kv_cache"]) in log


def test_level_2_discards_the_weights_and_keeps_runtime(engine):
    backend, memory, addresses, originals = engine
    backend.suspend(2)
    assert backend.status()["weights"]["discarded"] == 9096 and backend.status()["runtime"]["kept"] == 700
    backend.resume()
    assert torch.equal(memory.read(addresses["runtime"]), originals[addresses["runtime"]])
    assert int(memory.read(addresses["weights"])[0]) == 0xAB  # undefined after a level-2 resume


def test_resume_by_tag_restores_those_and_every_non_deferrable_tag_then_the_rest(engine):
    backend, memory, addresses, originals = engine
    backend.suspend(1)
    backend.resume(["weights"])
    assert backend.state() == "SUSPENDED"
    status = backend.status()
    assert status["weights"]["mapped"] == 9096 and status["runtime"]["mapped"] == 700
    assert status["default"]["mapped"] == 300 and status["kv_cache"]["discarded"] == 3000
    assert torch.equal(memory.read(addresses["weights"]), originals[addresses["weights"]])
    backend.resume(["kv_cache"])
    assert backend.state() == "RUNNING" and memory.held == sum(t.numel() for t in originals.values())


def test_suspend_and_resume_twice_are_no_ops_and_a_second_level_keeps_the_first_policy(engine, caplog):
    backend, memory, _, _ = engine
    backend.resume()
    assert backend.state() == "RUNNING" and memory.log == []
    backend.suspend(1)
    n = len(memory.log)
    with caplog.at_level(logging.WARNING, logger="memmgr"):
        backend.suspend(2)
    assert memory.log[n:] == [] and backend.state() == "SUSPENDED"
    assert "released already and keep what they hold" in caplog.text
    assert backend.status()["weights"]["kept"] == 9096


def test_discard_releases_without_copies_and_drops_host_copies_of_suspended_tags(engine):
    backend, memory, addresses, _ = engine
    backend.discard(("kv_cache",))
    assert backend.state() == "SUSPENDED" and ("copy_out", addresses["kv_cache"]) not in memory.log
    backend.resume()
    backend.suspend(1)
    free_before = backend.pool.bytes_free
    backend.discard(("weights",))
    assert backend.status()["weights"]["discarded"] == 9096
    assert backend.pool.bytes_free - free_before == 9096  # the host copies went back to the pool
    backend.resume()
    assert backend.state() == "RUNNING"


def test_host_buffers_are_reused_across_cycles(engine):
    backend, _, _, _ = engine
    backend.suspend(1)
    backend.resume()
    held = backend.pool.bytes_held
    for _ in range(3):
        backend.suspend(1)
        backend.resume()
    assert backend.pool.bytes_held == held == 9096 + 700


def test_an_allocation_vllm_freed_while_asleep_is_forgotten_at_resume(engine):
    backend, memory, addresses, _ = engine
    backend.suspend(1)
    memory.free(addresses["weights2"])
    backend.resume()
    assert backend.state() == "RUNNING" and "weights2" not in backend.status()


def test_out_of_memory_at_resume_maps_nothing_and_a_later_resume_works(engine):
    backend, memory, addresses, originals = engine
    backend.suspend(1)
    memory.fail_map_at = 2
    with pytest.raises(MemmgrOutOfMemoryError):
        backend.resume()
    assert backend.state() == "SUSPENDED" and memory.held == 0
    memory.fail_map_at = None
    backend.resume()
    assert torch.equal(memory.read(addresses["weights"]), originals[addresses["weights"]])


def test_a_failed_copy_at_suspend_releases_nothing_and_gives_the_host_buffers_back(engine):
    backend, memory, _, originals = engine
    memory.fail_copy_out = True
    with pytest.raises(RuntimeError, match="copy failed"):
        backend.suspend(1)
    assert backend.state() == "RUNNING" and memory.held == sum(t.numel() for t in originals.values())
    assert backend.pool.bytes_free == backend.pool.bytes_held
    memory.fail_copy_out = False
    backend.suspend(1)
    backend.resume()
    assert backend.state() == "RUNNING"


@pytest.mark.parametrize("level", [0, 3, True, "1", None])
def test_suspend_refuses_a_level_other_than_1_or_2(engine, level):
    backend, memory, _, _ = engine
    with pytest.raises(MemmgrInputError, match="level must be 1 .* or 2"):
        backend.suspend(level)
    assert backend.state() == "RUNNING" and memory.log == []


def test_resume_and_discard_refuse_tags_that_are_not_a_list_of_names(engine):
    backend, _, _, _ = engine
    with pytest.raises(MemmgrInputError, match="tags must be a list of tag names"):
        backend.resume("weights")
    with pytest.raises(MemmgrInputError, match="tags must be a list of tag names"):
        backend.discard(None)


def test_the_backend_is_a_vllm_sleep_mode_backend_that_keeps_communicators():
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

    assert issubclass(MemmgrSleepBackend, SleepModeBackend)
    assert MemmgrSleepBackend.preserves_communicators()
    if not torch.cuda.is_available():
        assert not MemmgrSleepBackend.is_supported()


# ---- selecting it in an engine ----

def _fake_llm(enable_sleep_mode: bool, workers: list) -> SimpleNamespace:
    config = SimpleNamespace(model_config=SimpleNamespace(enable_sleep_mode=enable_sleep_mode,
                                                          sleep_mode_backend="cumem"))
    return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config),
                           collective_rpc=lambda fn: [fn(w) for w in workers])


def _fake_worker(backend=None) -> SimpleNamespace:
    config = SimpleNamespace(model_config=SimpleNamespace(sleep_mode_backend="cumem"))
    return SimpleNamespace(vllm_config=config, _sleep_mode_backend=backend)


def test_use_memmgr_sleep_backend_selects_it_in_every_worker():
    workers = [_fake_worker(), _fake_worker()]
    llm = _fake_llm(True, workers)
    assert use_memmgr_sleep_backend(llm) == ["memmgr", "memmgr"]
    assert all(w.vllm_config.model_config.sleep_mode_backend == "memmgr" for w in workers)
    assert llm.llm_engine.vllm_config.model_config.sleep_mode_backend == "memmgr"


def test_use_memmgr_sleep_backend_refuses_an_engine_without_sleep_mode_or_one_that_slept_with_cumem():
    with pytest.raises(MemmgrInputError, match="enable_sleep_mode=True"):
        use_memmgr_sleep_backend(_fake_llm(False, []))
    with pytest.raises(MemmgrInputError, match="takes a vllm.LLM"):
        use_memmgr_sleep_backend(object())
    with pytest.raises(MemmgrStateError, match="slept with the CuMemBackend backend already"):
        use_memmgr_sleep_backend(_fake_llm(True, [_fake_worker(CuMemBackend())]))
