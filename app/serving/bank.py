"""``AdapterBank``: which adapter versions are where — device slots, host memory, or only the store.

Two bounded LRU tiers over the artifact store (vLLM's LoRA manager, S-LoRA):

* host memory holds :class:`~adapters_core.serving.PreparedAdapter` copies, up to
  ``host_capacity_bytes``; an entry that a request holds a lease on, or that is pinned, stays (so a
  leased version always has its host copy: a fetch of one whose copy was dropped while it sat in a
  slot reads it again);
* the device holds ``num_slots`` slots of the :class:`~adapters_core.serving.SlottedModel`; a slot
  whose adapter has rows running or is pinned is never taken. A slot whose adapter only has requests
  waiting may be: they get a slot again from the host copy when their turn comes.

``fetch`` (any thread) puts a version in host memory and leases it to one request; ``acquire``
(the engine thread, between forwards) gives the lease a device slot, loading into a free slot or
the least recently used one without running rows, or answers ``None`` while every slot runs rows
(``drain_candidate`` then names the slot the engine should let drain, so that the request is not
overtaken for ever); ``release`` ends the lease. ``evict`` forgets a version (deleted from the
registry): its host copy goes at once, its slot once no request holds it (requests accepted before still run on it). Keys are registry
version ids, so a new version or a moved alias is simply another key: nothing needs a restart.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_core.serving import PreparedAdapter, SlottedModel
from app.serving.errors import AdapterNotFound, NoFreeSlot

logger = logging.getLogger(__name__)

GONE_KEPT = 65536  # evicted version ids remembered, so that a request that resolved one just before keeps nothing


class BankEvents:
    """Counters the bank reports to (hits, misses and evictions per tier); no-ops by default."""

    def hit(self, tier: str) -> None: ...
    def miss(self, tier: str) -> None: ...
    def evicted(self, tier: str) -> None: ...
    def slots_used(self, n: int) -> None: ...


@dataclass(eq=False)
class BankEntry:
    """One adapter version known to the bank."""

    key: str
    ref: str
    prepared: PreparedAdapter | None = None
    nbytes: int = 0
    slot: int | None = None
    leases: int = 0  # requests holding it (waiting or running)
    running: int = 0  # rows in the running batch using its slot
    pinned: bool = False
    evicted: bool = False
    reading: bool = False  # a fetch is reading its host copy (the others wait on ``loading``)
    failure: Exception | None = None  # why the last read failed (the fetches that waited on it raise it too)
    loading: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class AdapterLease:
    """One request's hold on an adapter version; ``slot`` is set once it runs."""

    entry: BankEntry
    slot: int | None = None
    released: bool = False

    @property
    def ref(self) -> str:
        return self.entry.ref


class AdapterBank:
    """Device slots and a host-memory LRU of adapter versions (see the module docstring)."""

    def __init__(self, slotted: SlottedModel, *, host_capacity_bytes: int, events: BankEvents | None = None) -> None:
        self.slotted = slotted
        self.host_capacity_bytes = host_capacity_bytes
        self.events = events or BankEvents()
        self._lock = threading.Lock()
        self._entries: dict[str, BankEntry] = {}
        self._host: OrderedDict[str, BankEntry] = OrderedDict()  # LRU order, oldest first
        self._host_bytes = 0
        self._slots: OrderedDict[int, BankEntry] = OrderedDict()  # LRU order, oldest first
        self._free = list(range(slotted.num_slots, 0, -1))
        self._to_clear: list[int] = []
        self._warned_small_host = False
        self._gone: OrderedDict[str, None] = OrderedDict()  # versions evicted (deleted), the latest GONE_KEPT

    # ------------------------------------------------------------------ host tier (any thread)
    def fetch(self, key: str, ref: str, load: Callable[[], PreparedAdapter]) -> AdapterLease:
        """Lease version ``key`` to a request, reading it with ``load()`` unless host memory has it.

        ``load`` errors propagate (nothing is kept). Concurrent fetches of one version load it once, and share its
        error: a version that cannot be loaded is read once for them all, not once per waiting request in turn.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if key in self._gone:  # deleted after the request resolved its ref: it runs, nothing is kept
                    entry = BankEntry(key, ref, evicted=True)
                elif entry is None or entry.evicted:
                    entry = BankEntry(key, ref)
                    self._entries[key] = entry
                entry.leases += 1
                if entry.prepared is not None:
                    self._touch_host(entry)
                    self.events.hit("host")  # not read from the store; `acquire` counts the device tier
                    return AdapterLease(entry)
                owner = not entry.reading  # (a version in a slot whose host copy was dropped is read again)
                if owner:
                    entry.reading = True
                    entry.failure = None
                    entry.loading.clear()
            if owner:
                return self._load(entry, load)
            entry.loading.wait()
            with self._lock:
                if entry.prepared is not None:
                    self.events.hit("host")
                    return AdapterLease(entry)
                entry.leases -= 1
                failure = entry.failure
                if failure is not None:  # the owner's load failed: so does this fetch, with the same error
                    self._forget_if_unused(entry)
                    raise failure
                # (no error recorded: the owner was interrupted (BaseException): try again ourselves)

    def _load(self, entry: BankEntry, load: Callable[[], PreparedAdapter]) -> AdapterLease:
        self.events.miss("host")
        try:
            prepared = load()
        except BaseException as exc:
            with self._lock:
                entry.leases -= 1
                entry.failure = exc if isinstance(exc, Exception) else None
                self._forget_if_unused(entry)
                entry.reading = False
                entry.loading.set()
            raise
        with self._lock:
            entry.prepared = prepared
            entry.nbytes = prepared.nbytes
            if not entry.evicted:  # (evicted while read: its leases run on it, the host tier keeps no copy)
                self._host[entry.key] = entry
                self._host_bytes += entry.nbytes
                self._shrink_host()
            entry.reading = False
            entry.loading.set()
        return AdapterLease(entry)

    def _forget_if_unused(self, entry: BankEntry) -> None:
        """Drop ``entry`` from the bank if nothing holds or caches it (after a failed load)."""
        if (self._entries.get(entry.key) is entry and entry.prepared is None and entry.slot is None
                and not entry.leases):
            del self._entries[entry.key]

    def _touch_host(self, entry: BankEntry) -> None:
        if entry.key in self._host:
            self._host.move_to_end(entry.key)

    def _shrink_host(self) -> None:
        """Drop least recently used host copies nobody holds until under capacity: first those of versions in no
        slot, then those in a slot (a request on one of those reads its files again: logged once, as a sign
        that the host tier is smaller than what the slots hold)."""
        for in_slot in (False, True):
            for entry in list(self._host.values()):
                if self._host_bytes <= self.host_capacity_bytes:
                    return
                if entry.leases or entry.pinned or (entry.slot is not None) != in_slot:
                    continue
                if in_slot and not self._warned_small_host:
                    self._warned_small_host = True
                    logger.warning("the adapter host cache (%d bytes, ADAPTERFORGE_ADAPTER_HOST_CACHE_BYTES) holds less "
                                   "than the adapters in the slots: requests on them read their files again",
                                   self.host_capacity_bytes)
                self._drop_host(entry)
                self.events.evicted("host")

    def _drop_host(self, entry: BankEntry) -> None:
        if self._host.pop(entry.key, None) is not None:
            self._host_bytes -= entry.nbytes
        entry.prepared = None
        if entry.slot is None and self._entries.get(entry.key) is entry and not entry.leases:
            del self._entries[entry.key]

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def release(self, lease: AdapterLease) -> None:
        """End ``lease`` (its request finished, failed or was cancelled). Idempotent."""
        with self._lock:
            if lease.released:
                return
            lease.released = True
            entry = lease.entry
            entry.leases -= 1
            if lease.slot is not None:
                entry.running -= 1
            if entry.evicted and not entry.leases and entry.slot is not None:
                self._to_clear.append(entry.slot)
            self._shrink_host()

    # ------------------------------------------------------------------ device tier (engine thread)
    def acquire(self, lease: AdapterLease) -> int | None:
        """A device slot holding the lease's adapter, loading it if needed; ``None`` while every slot
        runs rows (see :meth:`drain_candidate`). Raises :class:`NoFreeSlot` when every slot is pinned to
        other adapters."""
        with self._lock:
            entry = lease.entry
            if lease.slot is not None:
                return lease.slot
            if entry.slot is not None:
                self._slots.move_to_end(entry.slot)
                self.events.hit("device")
            else:
                slot = self._take_slot()
                if slot is None:
                    if all(e.pinned for e in self._slots.values()):
                        self.events.miss("device")  # the request's one device lookup: it ends here
                        raise NoFreeSlot(
                            f"all {self.slotted.num_slots} adapter slots are pinned to other adapters; "
                            f"{entry.ref} cannot be loaded", param="adapter",
                        )
                    return None
                if entry.prepared is None:  # cannot happen while leases keep evicted slots; never lose the slot
                    self._free.append(slot)
                    self.events.slots_used(len(self._slots))  # (taking it may have evicted an adapter)
                    raise AdapterNotFound(f"{entry.ref} was deleted", param="adapter")
                self.events.miss("device")
                try:
                    self.slotted.load(slot, entry.prepared)
                except BaseException:
                    self.slotted.clear(slot)  # whatever was half-written; the slot goes back to the pool
                    self._free.append(slot)
                    self.events.slots_used(len(self._slots))
                    raise
                entry.slot = slot
                self._slots[slot] = entry
                self.events.slots_used(len(self._slots))
            entry.running += 1
            lease.slot = entry.slot
            return entry.slot

    def _take_slot(self) -> int | None:
        """A free slot, else the least recently used one no request holds, else the least recently used
        one whose requests all wait (they keep their host copy and get a slot again in their turn), else
        ``None`` (every slot runs rows or is pinned)."""
        if self._free:
            return self._free.pop()
        idle = [(slot, h) for slot, h in self._slots.items() if not h.running and not h.pinned]
        for slot, holder in sorted(idle, key=lambda item: item[1].leases > 0):  # (stable: LRU order within)
            if holder.leases and holder.prepared is None:
                continue  # its host copy is being read again (a fetch in progress): the slot has the only one
            del self._slots[slot]
            holder.slot = None
            if holder.prepared is None and not holder.leases and self._entries.get(holder.key) is holder:
                del self._entries[holder.key]
            self.events.evicted("device")
            return slot
        return None

    def drain_candidate(self, exclude: set[int]) -> int | None:
        """The slot to stop admitting rows on so that it frees for a request :meth:`acquire` answered
        ``None``: the least recently used one not pinned and not in ``exclude`` (slots already draining
        for older requests); ``None`` if there is none. Engine thread."""
        with self._lock:
            for slot, holder in self._slots.items():
                if slot not in exclude and not holder.pinned:
                    return slot
        return None

    def sweep(self) -> None:
        """Clear the slots of evicted versions that no row uses any more (engine thread)."""
        with self._lock:
            pending, self._to_clear = self._to_clear, []
            for k, slot in enumerate(pending):
                entry = self._slots.get(slot)
                if entry is None or not entry.evicted or entry.leases:
                    continue  # requests accepted before the eviction still run on it; the last release re-queues
                try:
                    self.slotted.clear(slot)
                except BaseException:  # the slot stays its version's, and is cleared at a later sweep
                    self._to_clear.extend(pending[k:])
                    raise
                del self._slots[slot]
                entry.slot = None
                self._free.append(slot)
                self.events.slots_used(len(self._slots))

    # ------------------------------------------------------------------ management (any thread)
    def evict(self, key: str) -> bool:
        """Forget version ``key`` (deleted): its host copy goes, its slot is freed once unused, and a fetch of it
        after this (a request that resolved it just before the deletion) runs on a copy kept nowhere."""
        with self._lock:
            self._gone[key] = None
            if len(self._gone) > GONE_KEPT:
                self._gone.popitem(last=False)
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            entry.evicted = True
            entry.pinned = False
            if self._host.pop(key, None) is not None:
                self._host_bytes -= entry.nbytes
            entry.prepared = None if not entry.leases else entry.prepared
            if entry.slot is not None and not entry.leases:
                self._to_clear.append(entry.slot)
            return True

    def pin(self, key: str) -> None:
        """Keep version ``key`` in host memory and, once loaded, in its slot. It must be known (fetched)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(f"adapter version {key} is not in the bank; fetch it first")
            entry.pinned = True

    def unpin(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pinned = False
                self._shrink_host()

    def where(self, key: str) -> str:
        """``"device"``, ``"host"`` or ``"store"``: the fastest tier holding version ``key``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return "store"
            return "device" if entry.slot is not None else "host" if entry.prepared is not None else "store"
