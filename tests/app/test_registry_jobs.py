"""Job leases, retries, cancellation and events (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.registry.jobs import (
    JobConflict,
    add_event,
    claim,
    create_job,
    finish,
    get_job,
    heartbeat,
    list_events,
    mark_enqueued,
    request_cancel,
    stale_jobs,
)
from app.registry.models import utcnow
from app.registry.progress import release_lease


def _job(sessions: sessionmaker[Session], **kw: object) -> str:
    with sessions.begin() as s:
        return create_job(s, type="train", adapter_name="bot", spec={"method": "lora"}, **kw).id  # type: ignore[arg-type]


def test_one_lease_at_a_time_and_expired_leases_are_retaken(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    now = utcnow()
    with sessions.begin() as s:
        assert claim(s, job_id, "w1", 60, now=now) is not None
    with sessions.begin() as s:
        assert claim(s, job_id, "w2", 60, now=now + timedelta(seconds=30)) is None  # w1 still holds it
        assert heartbeat(s, job_id, "w1", 60, now=now + timedelta(seconds=30))
        assert not heartbeat(s, job_id, "w2", 60, now=now)
    later = now + timedelta(seconds=200)  # w1 died: its lease ran out
    with sessions.begin() as s:
        assert stale_jobs(s, queued_for=3600, now=later) == [(job_id, "train", "lease_expired")]
        mark_enqueued(s, job_id, now=later)
        assert stale_jobs(s, queued_for=3600, now=later) == []  # rung once for this expiry, not on every pass
        job = claim(s, job_id, "w2", 60, now=later)
        assert job is not None and job.attempts == 2 and job.lease_owner == "w2"
    with sessions.begin() as s:
        assert not heartbeat(s, job_id, "w1", 60, now=later)  # the old worker lost it
        with pytest.raises(JobConflict):
            finish(s, job_id, "w1", "succeeded")
        finish(s, job_id, "w2", "succeeded", now=later)
    with sessions.begin() as s:
        kinds = [e.kind for e in list_events(s, job_id)]
        assert kinds == ["queued", "started", "resumed", "succeeded"]
        first_two = list_events(s, job_id, limit=2)
        assert [e.kind for e in list_events(s, job_id, after=first_two[-1].id)] == ["resumed", "succeeded"]


def test_a_handed_back_lease_is_not_renewed_by_a_late_heartbeat(sessions: sessionmaker[Session]) -> None:
    """A worker's lease keeper can beat once more after the worker handed the job back (shutdown): the
    job must stay claimable at once, not locked for another lease."""
    job_id = _job(sessions)
    with sessions.begin() as s:
        assert claim(s, job_id, "w1", 60) is not None
    with sessions.begin() as s:
        assert release_lease(s, job_id, "w1", refund_attempt=True)
    with sessions.begin() as s:
        assert not heartbeat(s, job_id, "w1", 60)  # the keeper's last beat
    with sessions.begin() as s:
        job = claim(s, job_id, "w2", 60, now=utcnow() + timedelta(milliseconds=1))
        assert job is not None and job.lease_owner == "w2" and job.attempts == 1


def test_attempt_limit_fails_the_job_with_a_clear_error(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions, max_attempts=2)
    t = utcnow()
    for i in range(2):
        with sessions.begin() as s:
            assert claim(s, job_id, f"w{i}", 10, now=t + timedelta(seconds=100 * i)) is not None
    with sessions.begin() as s:
        assert claim(s, job_id, "w9", 10, now=t + timedelta(seconds=500)) is None
        job = get_job(s, job_id)
        assert job.status == "failed" and job.error is not None
        assert job.error["code"] == "attempts_exhausted" and "2 attempts" in job.error["message"]


def test_cancel_queued_running_and_finished(sessions: sessionmaker[Session]) -> None:
    queued, running = _job(sessions), _job(sessions)
    with sessions.begin() as s:
        assert request_cancel(s, queued).status == "cancelled"
        claim(s, running, "w1", 60)
    with sessions.begin() as s:
        job = request_cancel(s, running)
        assert job.status == "running" and job.cancel_requested
        assert not heartbeat(s, running, "w1", 60)  # the worker learns it must stop
        finish(s, running, "w1", "cancelled")
    with sessions.begin() as s, pytest.raises(JobConflict, match="already cancelled"):
        request_cancel(s, running)


def test_queued_jobs_whose_message_was_lost_are_found(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions.begin() as s:
        assert stale_jobs(s, queued_for=60, now=utcnow()) == []
        assert stale_jobs(s, queued_for=60, now=utcnow() + timedelta(seconds=120)) == [(job_id, "train", "message_lost")]
        mark_enqueued(s, job_id, now=utcnow() + timedelta(seconds=100))
        assert stale_jobs(s, queued_for=60, now=utcnow() + timedelta(seconds=120)) == []  # rung again just now


def test_workers_racing_for_one_job_get_one_lease(sessions: sessionmaker[Session]) -> None:
    """Ten workers claim the same queued job at once: one gets it, on SQLite too (whose driver ignores
    FOR UPDATE and would let every claimant read "queued" before any wrote)."""
    job_id = _job(sessions)
    barrier = threading.Barrier(10)
    winners: list[str] = []
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        try:
            barrier.wait()
            with sessions.begin() as s:
                if claim(s, job_id, owner, 60) is not None:
                    winners.append(owner)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(winners) == 1, winners
    with sessions.begin() as s:
        job = get_job(s, job_id)
        assert (job.lease_owner, job.attempts) == (winners[0], 1)


def test_a_cancel_racing_the_workers_last_transaction_gets_a_conflict_not_a_deadlock(
    sessions: sessionmaker[Session],
) -> None:
    """The worker's last transaction records events (rows that reference the job) and then finishes the
    job; an API cancel arriving in between waits for it and answers 409, on PostgreSQL as on SQLite."""
    job_id = _job(sessions)
    with sessions.begin() as s:
        assert claim(s, job_id, "w1", 600) is not None
    worker = sessions()
    add_event(worker, job_id, "adapter_version", "registered bot@1")
    worker.flush()
    outcome: dict[str, str] = {}

    def cancel() -> None:
        try:
            with sessions.begin() as s:
                request_cancel(s, job_id)
            outcome["cancel"] = "ok"
        except JobConflict:
            outcome["cancel"] = "conflict"
        except Exception as exc:  # reported below
            outcome["cancel"] = f"{type(exc).__name__}: {exc}"

    canceller = threading.Thread(target=cancel)
    canceller.start()
    time.sleep(0.5)  # the cancel is waiting on the worker's transaction
    finish(worker, job_id, "w1", "succeeded")
    worker.commit()
    worker.close()
    canceller.join(60)
    assert outcome == {"cancel": "conflict"}
    with sessions.begin() as s:
        assert get_job(s, job_id).status == "succeeded"
