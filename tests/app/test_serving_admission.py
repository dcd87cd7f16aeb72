"""Which waiting requests join the batch, and which slot each gets: the engine's real ``_admit`` and the real
``AdapterBank`` over a recording stand-in for the slots, stepped by a simulation in which a row lasts its
``max_new_tokens`` steps (no model: thousands of steps in milliseconds)."""

from __future__ import annotations

import threading
from collections import deque

import torch

from app.serving.bank import AdapterBank
from app.serving.engine import EngineLimits, EngineMetrics, GenerationEngine, RequestHandle, _Request, _Row
from app.serving.sampling import SamplingParams
from tests.app.test_serving_bank import Prepared, RecordingSlots


class Scheduler:
    """The attributes ``GenerationEngine._admit`` reads, and a step that ages every running row by one token."""

    def __init__(self, slots: int, batch: int = 64) -> None:
        self.slotted = RecordingSlots(slots)
        self.bank = AdapterBank(self.slotted, host_capacity_bytes=100_000)  # type: ignore[arg-type]
        self.limits = EngineLimits(max_batch_size=batch, max_batch_tokens=1_000_000, max_queue_depth=100_000)
        self.metrics = EngineMetrics()
        self.tokenizer = None
        self.device = torch.device("cpu")
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.done: list[tuple[str, int, int]] = []  # adapter, step submitted, step finished

    _release = GenerationEngine._release

    def submit(self, adapter: str, tokens: int) -> None:
        lease = self.bank.fetch(adapter, f"{adapter}@1", lambda: Prepared(adapter))
        request = _Request([1, 2, 3], SamplingParams(max_new_tokens=tokens, temperature=0), lease,
                           RequestHandle(None, False), adapter, submitted=self.steps)
        self._waiting.append(request)

    def step(self) -> None:
        self.bank.sweep()
        self._rows.extend(GenerationEngine._admit(self))  # type: ignore[arg-type]
        self.batch_sizes.append(len(self._rows))
        for row in self._rows:
            row.generated.append(0)
        for row in self._rows:
            if len(row.generated) >= row.request.params.max_new_tokens:
                assert row.request.lease is not None and row.request.adapter is not None
                self.bank.release(row.request.lease)
                self.done.append((row.request.adapter, int(row.request.submitted), self.steps))
        self._rows = [r for r in self._rows if len(r.generated) < r.request.params.max_new_tokens]
        self.steps += 1

    def run(self, steps: int, *, clients: bool = False) -> None:
        """``steps`` steps; with ``clients``, each finished request is sent again at once (closed-loop clients)."""
        for _ in range(steps):
            finished = len(self.done)
            self.step()
            if clients:
                for adapter, _, _ in self.done[finished:]:
                    self.submit(adapter, 10)


def test_alternating_requests_on_two_adapters_and_one_slot_batch_by_adapter() -> None:
    """a, x, a, x, ... queued at once with one slot: all the a's in one batch, then all the x's (the slot
    draining for the first x does not hold back a's that end with the rows already on it)."""
    sim = Scheduler(slots=1)
    for _ in range(20):
        sim.submit("a", 10)
        sim.submit("x", 10)
    while sim._waiting or sim._rows:
        sim.step()
    assert (sim.slotted.loads, sim.steps, max(sim.batch_sizes)) == (2, 20, 20)


def test_steady_load_on_the_slotted_adapters_does_not_starve_a_third() -> None:
    """Two slots, closed-loop clients on three adapters: every adapter is served all along, the batch stays
    full-ish (rows on one adapter still run together) and no request waits longer than a few row lifetimes."""
    sim = Scheduler(slots=2)
    for adapter in "abc":
        for _ in range(8):
            sim.submit(adapter, 10)
    sim.run(2000, clients=True)
    served = {adapter: sum(1 for a, _, _ in sim.done if a == adapter) for adapter in "abc"}
    assert min(served.values()) > 400, served
    assert sum(sim.batch_sizes) / len(sim.batch_sizes) > 12
    assert max(end - start for _, start, end in sim.done) < 60


def test_a_blocked_request_gets_the_drained_slot_when_its_rows_end() -> None:
    """Every slot runs long rows; shorter requests on the same adapters keep joining them, later ones too. The
    request on a new adapter gets the least recently used slot as soon as the rows on it end."""
    sim = Scheduler(slots=2)
    sim.submit("a", 30)
    sim.step()
    sim.submit("b", 40)
    sim.step()
    sim.submit("c", 5)  # blocked: the drained slot is a's, free after step 29
    for step in range(2, 40):
        sim.submit("a", 5 if step < 25 else 30)  # short ones join a's slot; long ones would hold it: they wait
        sim.submit("b", 5)
        sim.step()
    c_done = [end for adapter, _, end in sim.done if adapter == "c"]
    assert c_done and c_done[0] <= 30 + 5, c_done
    while sim._waiting or sim._rows:
        sim.step()
    assert len(sim.done) == 3 + 2 * 38  # the held-back a's ran afterwards: nothing is lost


def test_a_request_that_cannot_start_fails_alone_and_frees_its_slot() -> None:
    """Building a row raises (here: no tokenizer for the stop-string tracker): that request is answered with
    the error and its slot is not left counted as running; the requests beside it run."""
    import pytest

    from app.serving.errors import ServingError

    sim = Scheduler(slots=1)
    lease = sim.bank.fetch("a", "a@1", lambda: Prepared("a"))
    failing = _Request([1, 2, 3], SamplingParams(max_new_tokens=5, stop=("x",)), lease, RequestHandle(None, False), "a")
    sim._waiting.append(failing)
    sim.submit("a", 5)
    sim.step()
    with pytest.raises(ServingError, match="generation failed"):
        failing.handle.wait(5)
    assert len(sim._rows) == 1 and not sim._waiting
    while sim._rows:
        sim.step()
    sim.submit("b", 5)  # a's slot is free again: b takes it
    sim.step()
    assert sim.slotted.held == {1: "b"}
