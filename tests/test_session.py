"""One stream's session in-process: a real hub, a fake backlog, no server, database or socket."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent

from attune_sse.core.event import ExecutionEvent, Pruned, UnknownEvent
from attune_sse.core.grants import Principal, compile_grants
from attune_sse.core.hub import Hub
from attune_sse.core.session import event_stream


def event(event_id: int, entity_id: int = 1, action_ref: str = "a.run") -> ExecutionEvent:
    return ExecutionEvent.from_record(event_id, entity_id, b'{"event_id": %d}' % event_id, action_ref=action_ref)


class Reader:
    """Runs the session's generator in a greenlet, as gunicorn would, collecting what it yields."""

    def __init__(self, body: Iterator[bytes]) -> None:
        self.parts: list[bytes] = []
        self.greenlet = gevent.spawn(self._run, body)
        gevent.sleep(0)

    def _run(self, body: Iterator[bytes]) -> None:
        for part in body:
            self.parts.append(part)

    @property
    def text(self) -> str:
        return b"".join(self.parts).decode()

    def until(self, predicate: Any, timeout: float = 2.0) -> str:
        with gevent.Timeout(timeout):
            while not predicate(self.text):
                gevent.sleep(0.01)
        return self.text


def test_a_new_stream_announces_its_position_then_sends_only_later_events() -> None:
    hub = Hub()
    hub.advance(41)
    reader = Reader(event_stream(hub, None, retry_ms=1500))
    assert reader.text == "id: 41\nretry: 1500\n\n: connected\n\n"  # the position, then the connected comment
    hub.publish_batch([event(40), event(42), event(43)])  # 40 is at or before the position: not owed
    text = reader.until(lambda t: "id: 43" in t)
    assert "id: 40" not in text and text.index("id: 42") < text.index("id: 43")
    hub.close()
    reader.greenlet.join(2)
    assert reader.text.endswith(": stream closed: shutdown\n\n")


def test_a_resume_replays_the_backlog_then_goes_live_without_a_duplicate() -> None:
    hub = Hub()
    hub.advance(10)
    asked: list[tuple[int, int]] = []

    def backlog(after: int, through: int, scope: Any) -> Iterator[tuple[list[ExecutionEvent], int]]:
        asked.append((after, through))
        yield [event(9)], 9
        hub.publish_batch([event(10), event(11)])  # 10 was in the backlog's range: it must not come twice
        yield [event(10)], 10
        yield [], 10

    reader = Reader(event_stream(hub, None, retry_ms=1000, last_event_id=8, backlog=backlog))
    text = reader.until(lambda t: "id: 11" in t)
    assert asked == [(8, 10)]
    assert "id: 8\n" not in text.split(": connected")[0], "a resuming client is not sent a position block"
    assert [line for line in text.splitlines() if line.startswith("id: ")] == ["id: 9", "id: 10", "id: 11"]
    hub.close()


def test_the_session_resets_a_client_whose_backlog_the_record_pruned_or_never_issued() -> None:
    """The record raises (Pruned, UnknownEvent); the session decides what the client is told: a reset
    whose id is where the replay goes on from, and then the rest, once."""
    hub = Hub()
    hub.advance(20)
    asked: list[tuple[int, int]] = []

    def backlog(after: int, through: int, scope: Any) -> Iterator[tuple[list[ExecutionEvent], int]]:
        asked.append((after, through))
        if after == 3:
            yield [event(4)], 4
            raise Pruned(12)  # pruned while the client read: it goes on after the horizon
        if after == 99:
            raise UnknownEvent(20)
        if after == 12:
            yield [event(13)], 13
        yield [], through

    pruned = Reader(event_stream(hub, None, retry_ms=1000, last_event_id=3, backlog=backlog))
    unknown = Reader(event_stream(hub, None, retry_ms=1000, last_event_id=99, backlog=backlog))
    hub.publish_batch([event(21)])
    text = pruned.until(lambda t: "id: 21" in t)
    assert [line for line in text.splitlines() if line.startswith(("id: ", "event: "))] == [
        "id: 4", "event: reset", "id: 12", "id: 13", "id: 21"]
    assert '"reason":"events you missed were pruned (retention)","resumed_from_event_id":12' in text
    text = unknown.until(lambda t: "id: 21" in t)
    assert [line for line in text.splitlines() if line.startswith(("id: ", "event: "))] == [
        "event: reset", "id: 20", "id: 21"]
    assert '"reason":"unknown event id: this server has no event after it"' in text
    assert asked == [(3, 20), (12, 20), (99, 20), (20, 20)]
    hub.close()


def test_signed_out_and_expired_streams_say_goodbye() -> None:
    hub = Hub()
    hub.advance(1)
    scope = compile_grants([{"resource": "executions", "actions": ["read"]}])[("executions", "read")]
    signed_out = Reader(event_stream(hub, None, retry_ms=1000, identity=7, scope=scope))
    expired = Reader(event_stream(hub, None, retry_ms=1000, expires_at=0))
    gevent.sleep(0.01)
    hub.apply_access({7: Principal(7, "gone", True, {})})
    hub.expire(now=1.0)
    signed_out.greenlet.join(2)
    expired.greenlet.join(2)
    assert "event: signed_out\n" in signed_out.text and "frozen or deleted" in signed_out.text
    assert "event: token_expired\n" in expired.text


def test_a_constrained_stream_is_sent_only_what_it_may_read_and_its_keepalive_moves_on() -> None:
    hub = Hub()
    hub.advance(1)
    scope = compile_grants([{"resource": "executions", "actions": ["read"],
                             "constraints": {"pack_refs": ["a"]}}])[("executions", "read")]
    reader = Reader(event_stream(hub, None, retry_ms=1000, identity=3, scope=scope))
    hub.publish_batch([event(2, action_ref="a.run"), event(3, action_ref="b.run"), event(4, action_ref="b.run")])
    reader.until(lambda t: "id: 2\n" in t)
    hub.tick()  # the keep-alive tick: offered nothing since, so it is woken
    hub.tick()
    text = reader.until(lambda t: "id: 4\n: keep-alive" in t)
    assert "id: 3\n" not in text and '"event_id": 4' not in text
    hub.close()
