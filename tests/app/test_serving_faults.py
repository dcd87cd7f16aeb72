"""Faults inside the serving engine and its slots: every request is still answered, no slot or lease is lost,
and no adapter is served with another's weights."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_core.peft_format import read_adapter
from app.serving.bank import AdapterLease
from app.serving.errors import ServingError, ServingUnavailable
from app.serving.host import ServingHost
from app.serving.sampling import SamplingParams
from app.settings import Settings

pytest.importorskip("peft", reason="peft writes the test adapters")

from tests.app.serving_helpers import peft_adapter

GREEDY = SamplingParams(max_new_tokens=6, temperature=0)
LONG = SamplingParams(max_new_tokens=120, min_new_tokens=120, temperature=0)
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def folders(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-adapters")
    return {"all": peft_adapter(demo_model_dir, root / "all", seed=1),
            "q": peft_adapter(demo_model_dir, root / "q", seed=2, target_modules=["q_proj"]),
            "other": peft_adapter(demo_model_dir, root / "other", seed=3),
            "r16": peft_adapter(demo_model_dir, root / "r16", seed=4, r=16)}


@pytest.fixture
def host(demo_model_dir: Path, tmp_path: Path) -> Iterator[ServingHost]:
    served = ServingHost.load(Settings(data_dir=tmp_path, base_model=str(demo_model_dir), adapter_slots=1))
    yield served
    served.close()


def lease(host: ServingHost, folders: dict[str, Path], name: str) -> AdapterLease:
    return host.bank.fetch(name, f"{name}@1", lambda: host.slotted.prepare(*read_adapter(folders[name])))


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def fail_writes_of_one_layer(host: ServingHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slot writes of the middle LoRA layer fail (a device error) until ``monkeypatch`` is undone: a slot load
    fails part-way, after the layers before it were written."""
    layers = list(host.slotted._lora_layers.values())
    victim = layers[len(layers) // 2]
    write = type(victim).write

    def failing_write(self: Any, slot: int, weights: Any) -> None:
        if self is victim:
            raise RuntimeError("device error (injected)")
        write(self, slot, weights)

    monkeypatch.setattr(type(victim), "write", failing_write)


def bank_holds(host: ServingHost, name: str) -> tuple[int, int]:
    entry = host.bank._entries[name]
    return entry.leases, entry.running


def test_a_failure_joining_the_running_cache_fails_only_the_new_rows_and_frees_their_slot(
        host: ServingHost, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill forward succeeded, then merging its cache into the running batch's failed (e.g. out of
    memory): the new rows are answered with the error and their leases released; the running rows go on."""
    import app.serving.engine as engine_module

    held = lease(host, folders, "all")  # (read and laid out now: that takes the lock the engine's steps hold)
    gate = threading.Event()  # the running row's steps wait for the joining request to be queued
    decode = host.engine._decode
    monkeypatch.setattr(host.engine, "_decode", lambda: gate.wait(30) and decode())
    running = host.engine.submit(PROMPT, LONG)
    wait_until(lambda: host.engine.running_rows == 1)
    concat = engine_module.concat
    calls = []

    def failing_concat(a: Any, b: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (injected)")
        return concat(a, b)

    monkeypatch.setattr(engine_module, "concat", failing_concat)
    joining = host.engine.submit(PROMPT, GREEDY, lease=held)
    gate.set()
    with pytest.raises(ServingError, match="out of memory"):
        joining.wait(30)
    assert bank_holds(host, "all") == (0, 0)
    other = host.engine.submit(PROMPT, GREEDY, lease=lease(host, folders, "other"))  # takes the only slot
    assert len(other.wait(60).token_ids) == 6
    result = running.wait(60)
    assert (result.finish_reason, len(result.token_ids)) == ("length", 120)


def test_a_slot_load_that_fails_part_way_leaves_nothing_of_that_adapter_in_the_slot(
        host: ServingHost, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A later adapter loaded into the slot (here one on q_proj only) must compute what it computes alone,
    not with the failed adapter's weights left on the other layers."""
    alone = host.engine.submit(PROMPT, GREEDY, lease=lease(host, folders, "q")).wait(60).token_ids
    host.evict(["q"])  # its slot is cleared and freed at the next sweep

    fail_writes_of_one_layer(host, monkeypatch)
    with pytest.raises(ServingError, match="device error"):
        host.engine.submit(PROMPT, GREEDY, lease=lease(host, folders, "all")).wait(30)
    monkeypatch.undo()
    again = host.engine.submit(PROMPT, GREEDY, lease=host.bank.fetch(
        "q2", "q@1", lambda: host.slotted.prepare(*read_adapter(folders["q"])))).wait(60)
    assert again.token_ids == alone


def test_a_failing_idle_sweep_does_not_stop_the_engine(host: ServingHost, folders: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    failures = []

    def failing_sweep() -> None:
        failures.append(1)
        raise RuntimeError("clear failed (injected)")

    monkeypatch.setattr(host.bank, "sweep", failing_sweep)
    wait_until(lambda: len(failures) >= 2)  # idle: the engine sweeps about once a second, and goes on
    assert host.engine.alive
    monkeypatch.undo()
    assert len(host.engine.submit(PROMPT, GREEDY).wait(60).token_ids) == 6


def test_an_engine_that_dies_answers_its_requests_and_refuses_new_ones(
        host: ServingHost, monkeypatch: pytest.MonkeyPatch) -> None:
    class Fatal(BaseException):
        pass

    entered = threading.Event()

    def fatal_step() -> None:
        entered.set()
        raise Fatal("a bug (injected)")

    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    monkeypatch.setattr(host.engine, "_step", fatal_step)
    waiting = host.engine.submit(PROMPT, GREEDY)
    assert entered.wait(30)
    with pytest.raises(ServingUnavailable):
        waiting.wait(30)
    wait_until(lambda: not host.engine.alive)
    with pytest.raises(ServingUnavailable):
        host.engine.submit(PROMPT, GREEDY)
    wait_until(lambda: bool(errors))
    assert isinstance(errors[0], Fatal)


def test_a_request_that_resolved_a_version_just_before_its_deletion_runs_and_keeps_nothing(
        host: ServingHost, folders: dict[str, Path]) -> None:
    host.evict(["all"])  # DELETE lands between resolving the ref and leasing it: the bank did not know it yet
    late = lease(host, folders, "all")
    assert len(host.engine.submit(PROMPT, GREEDY, lease=late).wait(60).token_ids) == 6
    host.engine.call(lambda: None).result()  # (a step boundary: the engine sweeps the freed slot)
    wait_until(lambda: host.bank.where("all") == "store")
    assert host.bank.host_bytes == 0 and "all" not in host.bank._entries


def test_the_key_value_cache_stays_within_max_batch_tokens_counted_as_the_padded_batch_holds_it(
        demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One long request, then short ones joining: the cache holds every row at the longest row's length, so
    admission counts rows x the longest reservation, not the sum of the reservations (which let a cache of
    9x the budget build up)."""
    budget = 400
    served = ServingHost.load(Settings(data_dir=tmp_path, base_model=str(demo_model_dir), max_batch_tokens=budget))
    held: list[int] = []
    decode = served.engine._decode

    def measured() -> None:
        kv = served.engine._kv
        assert kv is not None
        held.append(kv.batch_size * (kv.length + 1))  # (the step's own token joins the cache)
        decode()

    monkeypatch.setattr(served.engine, "_decode", measured)
    try:
        long_prompt = [5 + i % 50 for i in range(150)]
        long = served.engine.submit(long_prompt, SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0))
        wait_until(lambda: served.engine.running_rows == 1)
        short = [served.engine.submit([9, 10, 11], SamplingParams(max_new_tokens=16, min_new_tokens=16))
                 for _ in range(20)]
        assert len(long.wait(120).token_ids) == 40
        assert all(len(h.wait(120).token_ids) == 16 for h in short)
    finally:
        served.close()
    assert max(held) <= budget, max(held)


def test_a_failed_load_that_grew_a_layer_leaves_the_other_rows_right(
        demo_model_dir: Path, tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """With row buffers (no compiled kernel): a load that grew one layer's rank capacity (new, zeroed row buffers)
    and then failed on another layer left the running rows marked as synced: they decoded with zeros there."""
    host = ServingHost.load(Settings(data_dir=tmp_path, base_model=str(demo_model_dir), adapter_slots=3,
                                     cpu_kernels="off"))
    try:
        def fetch(name: str) -> AdapterLease:
            return host.bank.fetch(name, f"{name}@1", lambda: host.slotted.prepare(*read_adapter(folders[name])))

        alone = [host.engine.submit(PROMPT, LONG, lease=fetch(n)).wait(60).token_ids for n in ("all", "other")]
        grows = fetch("r16")  # (laid out now: the fault is in its slot write)
        gate, steps = threading.Event(), []
        decode = host.engine._decode

        def gated() -> None:
            steps.append(1)
            if len(steps) == 5:
                assert gate.wait(30)
            decode()

        monkeypatch.setattr(host.engine, "_decode", gated)
        running = host.engine.submit_all([(PROMPT, LONG, fetch("all")), (PROMPT, LONG, fetch("other"))])
        wait_until(lambda: len(steps) >= 5)
        fail_writes_of_one_layer(host, monkeypatch)
        failed = host.engine.submit(PROMPT, GREEDY, lease=grows)
        gate.set()
        with pytest.raises(ServingError, match="device error"):
            failed.wait(30)
        assert [h.wait(60).token_ids for h in running] == alone
    finally:
        host.close()


def test_a_slot_that_cannot_be_cleared_does_not_stop_other_requests(
        host: ServingHost, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A failing sweep inside a step made every step fail before admitting anything: requests hung, the engine
    spun and logged a traceback per step."""
    def failing_sweep() -> None:
        raise RuntimeError("clear failed (injected)")

    monkeypatch.setattr(host.bank, "sweep", failing_sweep)
    with caplog.at_level(logging.ERROR, logger="app.serving.engine"):
        for _ in range(3):
            assert len(host.engine.submit(PROMPT, GREEDY).wait(60).token_ids) == 6
    assert host.engine.alive
    assert sum("clearing the slots" in r.getMessage() for r in caplog.records) == 1  # (once a minute at most)
