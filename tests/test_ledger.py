"""The snapshot ledger on plain data: housekeeping, rescheduled by next_due, always ends
with every spare up to date and no more than MAX_SPARES kept, however long each run takes
(a run that outlasts a spare's grace once left it behind for good, with old secrets), and
however far a burst grew the rotation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from etcd_config_dispenser.ledger import BURST_MEMORY, Ledger, Snap

GRACE, MAX_SPARES, MIN_GRACE, MOST_SPARES = 0.25, 2, 0.005, 6


def run_housekeeping(ledger: Ledger, now: float, took: float) -> float | None:
    """One Housekeeper.run: what is due at ``now`` is done; the next due time is asked
    for when the run ends, ``took`` seconds later, as the Housekeeper does."""
    due = ledger.housekeeping(now)
    for spare, _paths in due.catch_up:
        ledger.caught_up(spare)
    while ledger.to_grow():  # the spares it wants, made (in one go here)
        assert ledger.live is not None
        ledger.growing = Snap(f"grown-{now}-{len(ledger.spares)}", ledger.live.seq, 0)
        ledger.grown(ledger.growing)
    return ledger.next_due(now + took)


def change(ledger: Ledger, name: str, revision: int, now: float) -> None:
    """One publish as the writer does it: a spare if one is ready, else short."""
    if ledger.take_spare(now) is None and ledger.spares:
        ledger.short(now)
    ledger.published(name, revision, [f"k{revision}"], now)


def test_a_grace_that_ends_during_a_run_is_not_forgotten() -> None:
    ledger = Ledger(GRACE, MAX_SPARES, MIN_GRACE)
    ledger.published("s0", 1, [], 0.0)
    for i, when in enumerate([0.00, 0.01, 0.02, 0.03], start=1):  # a burst
        ledger.published(f"s{i}", i + 1, ["key"], when)
        ledger.settle()
    next_due = run_housekeeping(ledger, 0.251, took=0.040)  # woken for s0's grace end
    assert next_due is not None  # s1's grace (0.26) ended during the run: due at once


@settings(max_examples=400, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 0.4) | st.floats(0.0, 0.004), min_size=1, max_size=24),
    runs=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=8),
)
def test_following_next_due_always_ends_clean(gaps: list[float], runs: list[float]) -> None:
    ledger = Ledger(GRACE, MAX_SPARES, MIN_GRACE, MOST_SPARES)
    now, due = 0.0, None
    ledger.published("s0", 1, [], now)
    ledger.settle()
    for i, gap in enumerate(gaps, start=1):
        # Housekeeping when due, before the next change (the publisher's rule).
        while due is not None and due <= now + gap:
            now = max(now, due)
            took = runs[i % len(runs)]
            due = run_housekeeping(ledger, now, took)
            now += took
        now += gap
        change(ledger, f"s{i}", i + 1, now)
        ledger.settle()  # signalled: nothing to roll back to (the writer's settle)
        due = ledger.next_due(now)
    for step in range(200):  # quiet from here on: follow next_due to the end
        if due is None:
            break
        now = max(now, due)
        took = runs[step % len(runs)]
        due = run_housekeeping(ledger, now, took)
        now += took
    assert ledger.live is not None
    assert [s.name for s in ledger.spares if s.seq != ledger.live.seq] == []
    assert len(ledger.spares) <= MAX_SPARES  # however far a burst grew it
    assert ledger.wanted == MAX_SPARES


def test_a_burst_grows_the_rotation_and_quiet_shrinks_it() -> None:
    """Changes 1 ms apart find every spare in its grace: each asks for one more, up to
    MOST_SPARES; the rotation stays while bursts come, and goes BURST_MEMORY later."""
    ledger = Ledger(GRACE, MAX_SPARES, MIN_GRACE, MOST_SPARES)
    ledger.published("s0", 1, [], 0.0)
    wanted = []
    for i in range(1, 40):
        change(ledger, f"s{i}", i + 1, i * 0.001)
        run_housekeeping(ledger, i * 0.001, 0.0)
        wanted.append(ledger.wanted)
    assert wanted == sorted(wanted)  # one more each time the rotation was short
    assert ledger.wanted == MOST_SPARES  # 6 x 1 ms covers the 5 ms grace
    run_housekeeping(ledger, 0.039 + BURST_MEMORY - 1, 0.0)
    assert ledger.wanted == MOST_SPARES  # a burst may come back: kept
    due = run_housekeeping(ledger, 0.039 + BURST_MEMORY + 1, 0.0)
    assert ledger.wanted == MAX_SPARES
    assert len(ledger.spares) == MAX_SPARES
    assert due is None
