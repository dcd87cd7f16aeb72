"""``AdapterBank``: the two LRU tiers, leases, pins and evictions, on a recording stand-in for the slots."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from app.serving.bank import AdapterBank, BankEvents
from app.serving.errors import NoFreeSlot


@dataclass
class Prepared:
    name: str
    nbytes: int = 100


class RecordingSlots:
    """Stands in for ``SlottedModel``: records what each slot holds."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.held: dict[int, str] = {}
        self.loads = 0

    def load(self, slot: int, prepared: Any) -> None:
        self.held[slot] = prepared.name
        self.loads += 1

    def clear(self, slot: int) -> None:
        self.held.pop(slot, None)


class Counting(BankEvents):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def hit(self, tier: str) -> None:
        self._add(f"{tier}.hit")

    def miss(self, tier: str) -> None:
        self._add(f"{tier}.miss")

    def evicted(self, tier: str) -> None:
        self._add(f"{tier}.eviction")


def make(slots: int = 2, capacity: int = 1000) -> tuple[AdapterBank, RecordingSlots, Counting]:
    recorder, events = RecordingSlots(slots), Counting()
    return AdapterBank(recorder, host_capacity_bytes=capacity, events=events), recorder, events  # type: ignore[arg-type]


def run(bank: AdapterBank, key: str) -> Any:
    """Fetch, acquire and release one request for ``key``; returns the slot it ran in."""
    lease = bank.fetch(key, f"{key}@1", lambda: Prepared(key))
    slot = bank.acquire(lease)
    bank.release(lease)
    return slot


def test_fetch_reads_once_then_hits_host_and_device() -> None:
    bank, recorder, events = make()
    loads = []
    lease = bank.fetch("a", "a@1", lambda: loads.append(1) or Prepared("a"))
    assert bank.where("a") == "host"
    slot = bank.acquire(lease)
    assert slot is not None and recorder.held[slot] == "a" and bank.where("a") == "device"
    bank.release(lease)
    again = bank.fetch("a", "a@1", lambda: loads.append(1) or Prepared("a"))
    assert bank.acquire(again) == slot and len(loads) == 1 and recorder.loads == 1
    assert events.counts == {"host.miss": 1, "device.miss": 1, "host.hit": 1, "device.hit": 1}  # one lookup per tier


def test_least_recently_used_idle_slot_is_taken() -> None:
    bank, recorder, events = make(slots=2)
    slot_a, slot_b = run(bank, "a"), run(bank, "b")
    run(bank, "a")  # a is now more recent than b
    slot_c = run(bank, "c")
    assert slot_c == slot_b and recorder.held == {slot_a: "a", slot_c: "c"}
    assert events.counts["device.eviction"] == 1


def test_slots_of_leased_adapters_are_never_taken() -> None:
    bank, recorder, _ = make(slots=2)
    running = bank.fetch("a", "a@1", lambda: Prepared("a"))
    bank.acquire(running)
    waiting = bank.fetch("b", "b@1", lambda: Prepared("b"))
    bank.acquire(waiting)  # has a slot, its request not finished
    third = bank.fetch("c", "c@1", lambda: Prepared("c"))
    assert bank.acquire(third) is None  # every slot busy: wait, not an error
    bank.release(running)
    assert bank.acquire(third) is not None and sorted(recorder.held.values()) == ["b", "c"]


def test_a_slot_whose_requests_all_wait_is_taken_last_and_they_reload_from_host() -> None:
    """Every slot busy: one runs rows, one only has a request waiting (held back by the engine), one is idle.
    A new adapter takes the idle one first, then the waiting one's: its request keeps the host copy and gets
    a slot again from it (no second read from the store)."""
    bank, recorder, _ = make(slots=3)
    reads: list[str] = []

    def fetch(key: str) -> Any:
        return bank.fetch(key, f"{key}@1", lambda: reads.append(key) or Prepared(key))

    running = fetch("a")
    bank.acquire(running)
    run(bank, "b")
    bank.release(fetch("b"))  # b: a slot, no request
    first_c = fetch("c")
    bank.acquire(first_c)
    bank.release(first_c)
    waiting = fetch("c")  # c: a slot, one request waiting
    d = fetch("d")
    slot_d = bank.acquire(d)
    assert recorder.held[slot_d] == "d" and bank.where("b") == "host" and bank.where("c") == "device"
    e = fetch("e")
    slot_e = bank.acquire(e)
    assert slot_e is not None and recorder.held[slot_e] == "e" and bank.where("c") == "host"
    assert bank.acquire(waiting) is None  # a, d, e all run rows now
    bank.release(d)
    assert recorder.held[bank.acquire(waiting)] == "c" and reads.count("c") == 1
    assert bank.acquire(running) is not None  # a still runs in its own slot


def test_a_leased_version_always_has_its_host_copy() -> None:
    """A version left only in a slot (its host copy dropped by the LRU) is read again when a request leases
    it, so that its slot can be freed while the request waits without losing the weights."""
    bank, recorder, events = make(slots=2, capacity=150)
    reads: list[str] = []
    run(bank, "a")
    run(bank, "b")  # over capacity: a's host copy goes, a stays in its slot
    assert bank.where("a") == "device" and "a" in recorder.held.values()
    lease = bank.fetch("a", "a@1", lambda: reads.append("a") or Prepared("a"))
    assert reads == ["a"] and events.counts["host.miss"] == 3
    assert bank.acquire(lease) is not None and recorder.loads == 2  # still in its slot: no copy to the device


def test_drain_candidate_is_the_least_recently_used_unpinned_slot_not_excluded() -> None:
    bank, _, _ = make(slots=3)
    leases = {k: bank.fetch(k, f"{k}@1", lambda k=k: Prepared(k)) for k in "abc"}
    slots = {k: bank.acquire(lease) for k, lease in leases.items()}
    bank.pin("a")
    assert bank.drain_candidate(set()) == slots["b"]
    assert bank.drain_candidate({slots["b"]}) == slots["c"]
    assert bank.drain_candidate({slots["b"], slots["c"]}) is None  # only the pinned one is left


def test_every_slot_pinned_to_others_is_no_free_slot() -> None:
    bank, _, events = make(slots=1)
    run(bank, "a")
    bank.pin("a")
    lease = bank.fetch("b", "b@1", lambda: Prepared("b"))
    with pytest.raises(NoFreeSlot, match="pinned"):
        bank.acquire(lease)
    assert events.counts["device.miss"] == 2  # the refused request's device lookup counts too
    bank.unpin("a")
    assert bank.acquire(lease) is not None


def test_host_tier_keeps_leased_and_pinned_and_drops_the_oldest() -> None:
    bank, _, events = make(slots=1, capacity=250)  # room for two 100-byte adapters

    def visit(key: str) -> None:
        bank.release(bank.fetch(key, f"{key}@1", lambda: Prepared(key)))

    held = bank.fetch("a", "a@1", lambda: Prepared("a"))
    for key in ("b", "c", "d"):
        visit(key)
    assert [bank.where(k) for k in "abcd"] == ["host", "store", "store", "host"]  # a is leased: kept
    bank.release(held)
    bank.pin("d")
    for key in ("e", "f"):
        visit(key)
    assert [bank.where(k) for k in "adef"] == ["store", "host", "store", "host"]  # d is pinned: kept
    assert bank.host_bytes == 200 and events.counts["host.eviction"] == 4


def test_a_failed_read_is_not_cached() -> None:
    bank, _, _ = make()

    def broken() -> Prepared:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        bank.fetch("a", "a@1", broken)
    assert bank.where("a") == "store"
    assert run(bank, "a") is not None


def test_concurrent_fetches_read_once() -> None:
    bank, _, _ = make()
    reads = []

    def slow() -> Prepared:
        reads.append(1)
        time.sleep(0.2)
        return Prepared("a")

    leases: list[Any] = []
    threads = [threading.Thread(target=lambda: leases.append(bank.fetch("a", "a@1", slow))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len(leases) == 5


def test_concurrent_fetches_of_a_version_that_cannot_load_read_it_once_and_share_the_error() -> None:
    """Each waiting request read the broken version again in turn (8 requests: 8 reads, the last answered after
    8 times the read); they now all get the one read's error, and a later request reads it afresh."""
    bank, _, _ = make()
    reads: list[int] = []
    started, release = threading.Event(), threading.Event()

    def broken() -> Prepared:
        reads.append(1)
        started.set()
        release.wait(10)
        raise ValueError("truncated file")

    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            bank.fetch("a", "a@1", broken)
        except ValueError as exc:
            errors.append(exc)

    owner = threading.Thread(target=fetch)
    owner.start()
    assert started.wait(10)
    waiters = [threading.Thread(target=fetch) for _ in range(4)]
    for t in waiters:
        t.start()
    deadline = time.monotonic() + 10
    while bank._entries["a"].leases < 5:  # every waiter is waiting on the owner's read
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    for t in (owner, *waiters):
        t.join()
    assert len(reads) == 1 and len(errors) == 5 and all("truncated" in str(e) for e in errors)
    assert bank.where("a") == "store" and "a" not in bank._entries
    with pytest.raises(ValueError):
        bank.fetch("a", "a@1", broken)
    assert len(reads) == 2


def test_evicting_a_running_version_clears_its_slot_after_its_rows_finish() -> None:
    bank, recorder, _ = make(slots=2)
    lease = bank.fetch("a", "a@1", lambda: Prepared("a"))
    slot = bank.acquire(lease)
    assert bank.evict("a") and bank.where("a") == "store"
    bank.sweep()
    assert recorder.held == {slot: "a"}  # still running: untouched
    bank.release(lease)
    bank.sweep()
    assert recorder.held == {}
    idle_slot = run(bank, "b")
    bank.evict("b")
    bank.sweep()
    assert idle_slot not in recorder.held
    assert run(bank, "b") is not None  # a new version under that key loads afresh


def test_a_request_waiting_on_a_deleted_version_still_runs_and_no_slot_is_lost() -> None:
    """The version sits in a slot with its host copy dropped; a request leases it and waits; the version is
    deleted and the engine sweeps. The request was accepted before the delete: it runs on the slot, which is
    cleared after it, and the slot serves other adapters afterwards."""
    bank, recorder, _ = make(slots=1, capacity=50)  # host memory smaller than one adapter
    assert run(bank, "a") == 1 and bank.where("a") == "device"
    waiting = bank.fetch("a", "a@1", lambda: Prepared("a"))
    assert bank.evict("a")
    bank.sweep()
    assert bank.acquire(waiting) == 1 and recorder.held == {1: "a"}
    bank.release(waiting)
    bank.sweep()
    assert recorder.held == {}
    for key in ("b", "c"):
        assert run(bank, key) == 1 and recorder.held == {1: key}


def test_a_failed_slot_load_gives_the_slot_back() -> None:
    bank, _, _ = make(slots=1)

    class Broken(RecordingSlots):
        def load(self, slot: int, prepared: Any) -> None:
            if prepared.name == "bad":
                raise RuntimeError("copy failed")
            super().load(slot, prepared)

    broken = Broken(1)
    bank.slotted = broken  # type: ignore[assignment]
    lease = bank.fetch("bad", "bad@1", lambda: Prepared("bad"))
    with pytest.raises(RuntimeError, match="copy failed"):
        bank.acquire(lease)
    bank.release(lease)
    assert bank.where("bad") == "host"
    assert run(bank, "good") == 1 and broken.held == {1: "good"}


def test_a_version_deleted_while_it_is_read_still_serves_its_request_and_is_not_cached() -> None:
    bank, recorder, _ = make(slots=1)

    def read_then_deleted() -> Prepared:
        bank.evict("a")  # DELETE /adapters/a/versions/1 while the store read runs
        return Prepared("a")

    lease = bank.fetch("a", "a@1", read_then_deleted)
    assert bank.host_bytes == 0 and bank.where("a") == "store"  # no copy kept for new requests
    slot = bank.acquire(lease)  # the request accepted before the deletion runs on it
    assert slot is not None and recorder.held[slot] == "a"
    bank.release(lease)
    bank.sweep()
    assert recorder.held == {}


def test_host_copies_of_versions_in_no_slot_go_before_those_in_a_slot() -> None:
    """A host tier too small for everything drops copies that nothing else holds first: a request on an adapter
    sitting in a slot then needs no store read."""
    bank, _, _ = make(slots=2, capacity=350)
    reads: list[str] = []

    def fetch(key: str) -> Any:
        return bank.fetch(key, f"{key}@1", lambda: reads.append(key) or Prepared(key))

    for key in ("a", "b"):  # both in slots
        lease = fetch(key)
        bank.acquire(lease)
        bank.release(lease)
    for key in ("c", "d"):  # in no slot: d's read leaves the tier over capacity
        bank.release(fetch(key))
    assert [bank.where(k) for k in "abcd"] == ["device", "device", "store", "host"]
    for key in ("a", "b"):
        bank.release(fetch(key))
    assert reads == ["a", "b", "c", "d"]
