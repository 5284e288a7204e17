"""The dispatcher alone, under random connects, disconnects, reports, writes and timeouts.

A hypothesis state machine drives broker.Dispatcher with a fake clock and
checks after every step that each message is in exactly one state (assigned
to a stream but not yet written, leased, waiting for a retry, done, dead),
leased to at most one worker, charged an attempt only for a batch that was
written, never delivered more than max_attempts times, never leased once the
broker stops, and that done and dead stay disjoint.
"""

import itertools
import json
import random

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, multiple, rule)

import broker

MAX_ATTEMPTS = 3
LEASE = 10.0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class DispatcherMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    @initialize(total=st.one_of(st.none(), st.integers(0, 30)), durable=st.booleans(),
                retry_delay=st.sampled_from([0.0, 0.5, 3.0]))
    def start(self, total, durable, retry_delay):
        self.clock = FakeClock()
        counter = itertools.count()
        self.events = []
        self.done = set()
        self.dead = set()
        self.leased_to = {}     # id -> session token, from the events
        self.deliveries = {}    # id -> number of leases seen
        self.total = total
        self.stopped = False
        self.drained = False  # a drain began: nothing is assigned from then on
        self.dispatcher = broker.Dispatcher(
            max_attempts=MAX_ATTEMPTS, lease_timeout=LEASE, total=total, seed=7,
            new_id=lambda: "m%06d" % next(counter), clock=self.clock, on_event=self.on_event,
            durable=durable, retry_delay=retry_delay, retry_delay_max=4.0,
            rng=random.Random(3))
        self.retry_delay = retry_delay
        self.not_before = {}  # id -> when its last failed attempt lets it go again

    def on_event(self, kind, message, session):
        mid = message.id
        assert mid not in self.done and mid not in self.dead, (kind, mid)
        if kind == "lease":
            assert not self.stopped, "%s leased after stop" % mid
            assert self.clock.now >= self.not_before.get(mid, 0.0), "%s leased before due" % mid
            assert mid not in self.leased_to, "%s leased twice at once" % mid
            self.leased_to[mid] = session.token
            self.deliveries[mid] = self.deliveries.get(mid, 0) + 1
            assert self.deliveries[mid] == message.attempts <= MAX_ATTEMPTS
            return
        assert self.leased_to.pop(mid) == session.token, (kind, mid)
        if kind == "failed":  # (its wait: the backoff, within its bounds)
            wait = getattr(message, "due", 0.0) - self.clock.now
            if self.retry_delay:
                full = min(4.0, self.retry_delay * 2 ** (message.attempts - 1))
                assert full / 2 - 1e-9 <= wait <= full + 1e-9, (mid, wait, full)
                self.not_before[mid] = message.due
            else:
                assert wait <= 0
        if kind == "done":
            self.done.add(mid)
        elif kind == "dead":
            assert message.attempts == MAX_ATTEMPTS
            self.dead.add(mid)

    @rule(target=sessions, batchsize=st.integers(1, 4))
    def connect(self, batchsize):
        session = self.dispatcher.connect(batchsize)
        self.dispatcher.dispatch_once()
        if session is None:  # refused while stopping or draining
            assert self.stopped or self.drained
            return multiple()
        return session

    @rule(session=consumes(sessions))
    def disconnect(self, session):
        self.dispatcher.disconnect(session)
        self.dispatcher.dispatch_once()

    @rule(session=sessions, data=st.data())
    def report(self, session, data):
        batch = session.batch
        ids = list(batch.messages) if batch else []
        chosen = data.draw(st.lists(st.sampled_from(ids), max_size=6) if ids else st.just([]))
        others = sorted((self.done | self.dead | set(self.leased_to)) - set(ids)) or ["x"]
        foreign = data.draw(st.lists(st.sampled_from(others), max_size=3))
        wrong_batch = data.draw(st.booleans()) if batch else True
        last = data.draw(st.booleans())
        number = (batch.number if batch else 0) + (1 if wrong_batch else 0)
        snapshot = dict(self.dispatcher.snapshot()["leases"])
        try:
            result, _seq, next_batch = self.dispatcher.report(
                session.token, number, chosen + foreign, last=last)
            assert next_batch is None or next_batch is session.batch
            if last or self.drained:  # no next batch; its stream is to end
                assert next_batch is None and session.batch is None
                assert session.token not in self.dispatcher.snapshot()["free"]
                assert self.dispatcher.stream_ends(session) is not None
        except broker.ReportError as error:
            assert error.status in (404, 409)
            assert session.closed or wrong_batch or batch is None
            assert self.dispatcher.snapshot()["leases"] == snapshot  # changed nothing
            return
        assert not wrong_batch
        assert result["done"] == len(set(chosen))
        assert result["done"] + result["retried"] + result["dead"] == len(batch.messages)
        assert result["ignored"] == list(dict.fromkeys(foreign))
        if next_batch is not None and data.draw(st.booleans()):  # (written at once)
            self.dispatcher.batch_written(session, next_batch)
        self.dispatcher.dispatch_once()

    @rule(session=sessions)
    def batch_written(self, session):
        if session.batch is not None:
            self.dispatcher.batch_written(session, session.batch)
        self.dispatcher.dispatch_once()

    @rule(session=consumes(sessions))
    def batch_write_fails(self, session):
        batch = session.batch
        if batch is None or batch.written:
            return
        assigned = dict(self.dispatcher.snapshot()["attempts"])
        self.dispatcher.batch_not_written(session, batch, "write failed")
        after = self.dispatcher.snapshot()
        for mid in batch.messages:  # back, uncharged, unless given to another worker at once
            assert after["attempts"][mid] == assigned[mid] - 1 or mid in after["assigned"]
            assert mid not in after["leases"]

    @rule(session=sessions, data=st.data())
    def touch(self, session, data):
        batch = session.batch
        wrong_batch = data.draw(st.booleans()) if batch else True
        number = (batch.number if batch else 0) + (1 if wrong_batch else 0)
        try:
            lease_ms, _ticket, _sent_at = self.dispatcher.touch(session.token, number)
        except broker.ReportError as error:
            assert error.status in (404, 409)
            assert session.closed or wrong_batch or batch is None
            return
        assert lease_ms == LEASE * 1000 and batch.written  # (a touch starts its lease)
        assert batch.deadline == self.clock.now + LEASE

    @rule()
    def drain(self):
        self.dispatcher.drain()
        self.drained = True
        assert not self.dispatcher.snapshot()["assigned"]

    @rule()
    def stop(self):
        self.dispatcher.stop()
        self.stopped = True
        assert not self.dispatcher.snapshot()["assigned"]

    @rule(seconds=st.one_of(st.floats(0, 2), st.floats(0, 2 * LEASE)))  # (delays: 0.25..4 s)
    def time_passes(self, seconds):
        self.clock.now += seconds
        self.dispatcher.dispatch_once()

    @invariant()
    def each_message_is_in_exactly_one_state(self):
        if not hasattr(self, "dispatcher"):
            return
        state = self.dispatcher.snapshot()
        leased = set(state["leases"])
        assigned = set(state["assigned"])
        retrying = set(state["retry"])
        assert len(retrying) == len(state["retry"])
        assert not (leased & assigned)
        for held in (leased, assigned):
            assert not (held & retrying) and not (held & self.done) and not (held & self.dead)
        assert not (retrying & self.done) and not (retrying & self.dead)
        assert not (self.done & self.dead)
        everything = leased | assigned | retrying | self.done | self.dead
        assert len(everything) == self.dispatcher.queue.generated
        assert set(self.deliveries) <= everything
        if self.total is not None:
            assert self.dispatcher.queue.generated <= self.total
        assert leased == set(self.leased_to)
        for mid, (token, _number) in state["leases"].items():
            assert self.leased_to[mid] == token
        for mid, attempts in state["attempts"].items():  # charged for written batches only
            assert attempts == self.deliveries.get(mid, 0) + (mid in assigned) <= MAX_ATTEMPTS
        if self.stopped or self.drained:
            assert not assigned
        # Nothing is given out before it is due (assigned, and so leased).
        assert not [mid for mid in assigned if self.not_before.get(mid, 0.0) > self.clock.now]
        # Leases are kept in deadline order (the loop sleeps until the first), touched or not.
        deadlines = [b.deadline for b in self.dispatcher._batches.values()]
        assert deadlines == sorted(deadlines)

    @rule()
    def state_writer_saves(self):
        changes = self.dispatcher.take_changes(timeout=0)
        if changes is None:
            return
        for message_id, record in changes.pending.items():
            if record is None:
                assert message_id in self.done or message_id in self.dead
            else:
                assigned = message_id in self.dispatcher.snapshot()["assigned"]
                record = json.loads(record)
                assert record["in_flight"] == (message_id in self.leased_to or assigned)
                assert record["attempts"] == self.deliveries.get(message_id, 0) + assigned
        self.dispatcher.changes_written(changes, ok=True)

    @invariant()
    def free_workers_hold_no_batch_and_busy_ones_are_not_free(self):
        if not hasattr(self, "dispatcher"):
            return
        state = self.dispatcher.snapshot()
        for token in state["free"]:
            assert state["sessions"][token] is None
        assert len(set(state["free"])) == len(state["free"])

    @invariant()
    def nothing_waits_while_a_free_worker_could_take_it(self):
        if not hasattr(self, "dispatcher"):
            return
        state = self.dispatcher.snapshot()
        assert not (self.drained and state["free"])  # a drain keeps no worker free
        if state["free"] and not self.stopped:
            # (Those not due yet wait: the loop wakes for them when they are.)
            # (The halves wait for the latest of them: PROTOCOL.md rule 4a.)
            in_halves = sum(state["halves"], [])
            halves_due = max([state["due"].get(mid, 0.0) for mid in in_halves] + [0.0])
            assert not [mid for mid in state["retry"] if self.clock.now >= (
                halves_due if mid in in_halves else state["due"].get(mid, 0.0))]
            assert self.total is not None and self.dispatcher.queue.generated == self.total
            due = self.dispatcher.queue.next_due()
            assert (due is None) == (not state["retry"]) and (due is None or due > self.clock.now)

    @invariant()
    def what_waits_goes_in_due_order(self):
        if not hasattr(self, "dispatcher"):
            return
        state = self.dispatcher.snapshot()
        flat = [mid for mid in state["retry"] if mid not in sum(state["halves"], [])]
        dues = [max(state["due"].get(mid, 0.0), self.clock.now) for mid in flat]
        assert dues == sorted(dues)


DispatcherMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
test_dispatcher_keeps_its_invariants = DispatcherMachine.TestCase


def test_report_of_a_closed_session_is_404():
    dispatcher = broker.Dispatcher(new_id=iter(["a", "b", "c"]).__next__, total=3)
    session = dispatcher.connect(3)
    dispatcher.dispatch_once()
    number = session.batch.number
    dispatcher.disconnect(session)
    with pytest.raises(broker.ReportError) as error:
        dispatcher.report(session.token, number, ["a", "b", "c"])
    assert error.value.status == 404
    assert dispatcher.snapshot()["retry"] == ["a", "b", "c"]


def test_a_touched_lease_outlives_a_later_one_and_both_expire_on_time():
    clock = FakeClock()
    dispatcher = broker.Dispatcher(lease_timeout=LEASE, clock=clock, seed=1)
    first, second = dispatcher.connect(1), dispatcher.connect(1)
    dispatcher.batch_written(first, first.batch)       # its lease: 0 .. 10
    clock.now = 1.0
    dispatcher.batch_written(second, second.batch)     # 1 .. 11
    clock.now = 2.0
    dispatcher.touch(first.token, first.batch.number)  # now 2 .. 12
    clock.now = 11.5
    dispatcher.dispatch_once()
    assert second.closed and second.close_reason == "lease expired"
    assert not first.closed
    clock.now = 12.5
    dispatcher.dispatch_once()
    assert first.closed and first.close_reason == "lease expired"


def test_a_drain_ends_the_free_streams_and_gives_out_nothing_more():
    dispatcher = broker.Dispatcher(total=2, seed=1)
    busy = dispatcher.connect(2)
    dispatcher.batch_written(busy, busy.batch)
    free = dispatcher.connect(2)  # nothing left for it: free
    assert dispatcher.snapshot()["free"] == [free.token]
    assert dispatcher.drain() == (1, 2)
    assert dispatcher.snapshot()["free"] == []
    assert dispatcher.stream_ends(free) == "shutdown"
    assert dispatcher.stream_ends(busy) is None  # it may still report
    assert dispatcher.connect(2) is None
    result, _seq, next_batch = dispatcher.report(busy.token, busy.batch.number, [])
    assert result["retried"] == 2 and next_batch is None  # retried, but not now
    assert dispatcher.stream_ends(busy) == "shutdown"
    assert dispatcher.wait_drained(0)


def test_figures_show_a_batch_assigned_but_not_yet_written_as_just_begun():
    clock = FakeClock()
    dispatcher = broker.Dispatcher(total=4, seed=1, clock=clock)
    assigned = dispatcher.connect(2)  # a batch for its writer, not on the wire yet
    written = dispatcher.connect(2)
    dispatcher.batch_written(written, written.batch)
    free = dispatcher.connect(2)  # nothing left for it
    clock.now += 1.5
    figures = dispatcher.figures()
    ages = {w["worker"]: w["batch_age_s"] for w in figures.dashboard()["workers_detail"]}
    assert ages == {assigned.name: 0.0, written.name: 1.5, free.name: None}
    assert figures.busy_workers == 2 and figures.in_flight == 4


def test_a_failed_attempt_waits_its_retry_delay_doubling_and_capped_then_goes_first():
    clock = FakeClock()
    dispatcher = broker.Dispatcher(lease_timeout=LEASE, clock=clock, seed=1, retry_delay=1.0,
                                   retry_delay_max=3.0, rng=random.Random(5))
    session = dispatcher.connect(1)
    dispatcher.batch_written(session, session.batch)
    [first] = session.batch.messages
    waits = []
    for attempt in (1, 2, 3):
        failed_at = clock.now
        dispatcher.report(session.token, session.batch.number, [])  # (not done: it fails)
        # Not due yet: the worker gets a new message, and `first` waits, delayed.
        assert session.batch is not None and first not in session.batch.messages
        figures = dispatcher.figures()
        assert (figures.delayed, figures.retrying) == (1, 0)
        due = dispatcher.queue.next_due()
        waits.append(due - failed_at)
        dispatcher.report(session.token, session.batch.number, list(session.batch.messages))
        assert first not in session.batch.messages  # (still not due)
        clock.now = due
        dispatcher.report(session.token, session.batch.number, list(session.batch.messages))
        assert list(session.batch.messages) == [first]  # due: before the new ones
        assert session.batch.messages[first].attempts == attempt + 1
        dispatcher.batch_written(session, session.batch)
        if attempt == 2:
            break
    # min(max, delay x 2^(n-1)) x [0.5, 1]: 0.5..1, then 1..2 (capped at 3 s after that).
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0


def test_a_worker_s_retry_in_ms_overrides_the_delay_capped():
    clock = FakeClock()
    dispatcher = broker.Dispatcher(lease_timeout=LEASE, clock=clock, seed=1, retry_delay=1.0,
                                   retry_delay_max=3.0)
    session = dispatcher.connect(2)
    dispatcher.batch_written(session, session.batch)
    a, b = session.batch.messages
    dispatcher.report(session.token, session.batch.number, [], failures={
        a: broker.Failure("soon", False, 50), b: broker.Failure("later", False, 10 ** 7)})
    state = dispatcher.snapshot()
    assert state["due"][a] == pytest.approx(clock.now + 0.05)
    assert state["due"][b] == pytest.approx(clock.now + 3.0)  # (capped)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@pytest.mark.parametrize("kind", ["message", "job"])
@given(period=st.none() | st.integers(1, 1000), attempts=st.integers(0, 5),
       reason=st.none() | st.sampled_from(broker.FAILURE_REASONS), error=st.none() | st.text(),
       payload=st.none() | json_values, key=st.none() | st.text(min_size=1),
       in_flight=st.booleans(),
       not_before=st.none() | st.floats(0, 4e9, allow_nan=False).map(lambda t: round(t, 3)))
def test_a_pending_record_formatted_directly_is_the_record_s_json(
        kind, period, attempts, reason, error, payload, key, in_flight, not_before):
    message_id = broker.XidGenerator().take(1)[0]
    if kind == "message":
        message = broker.Message(message_id, period or 1)
    else:
        message = broker.Job(message_id, period if payload is not None else period or 5,
                             payload, key)
    message.attempts, message.reason = attempts, reason
    if error is not None:
        message.error = error
    assert broker.pending_record_json(message, in_flight, not_before) == \
        broker._compact_json(broker.pending_record(message, in_flight, not_before))
