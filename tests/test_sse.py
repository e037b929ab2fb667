"""SSE framing, without a server."""

from __future__ import annotations

import pytest

from attune_sse.core.event import ExecutionEvent, PayloadError, parse_notification
from attune_sse.core.sse import KEEPALIVE, Frame, comment


def test_message_with_id_and_data() -> None:
    assert str(Frame(data='{"a": 1}', id=7)) == 'id: 7\ndata: {"a": 1}\n\n'


def test_multiline_data_becomes_several_data_lines() -> None:
    assert str(Frame(data="one\ntwo\r\nthree\rfour")) == "data: one\ndata: two\ndata: three\ndata: four\n\n"


def test_event_and_retry_fields() -> None:
    assert str(Frame(data="x", event="reload", retry=2500)) == "event: reload\nretry: 2500\ndata: x\n\n"


def test_retry_only_message() -> None:
    assert Frame(retry=3000).encode() == b"retry: 3000\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb"])
def test_line_break_in_id_or_event_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        str(Frame(data="x", id=bad))
    with pytest.raises(ValueError, match="line break"):
        str(Frame(data="x", event=bad))


def test_nul_in_id_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        str(Frame(data="x", id="a\0b"))


def test_comments() -> None:
    assert KEEPALIVE == b": keep-alive\n\n"
    assert comment("two\nlines") == b": two\n: lines\n\n"


def test_unicode_is_utf8() -> None:
    assert Frame(data="ünï ✓").encode() == "data: ünï ✓\n\n".encode()


def test_execution_event_frame_is_built_once() -> None:
    payload = '{"entity_type":"execution","entity_id":5,"event_id":42,"data":{"id":5,"n":"ü"}}'
    event = ExecutionEvent.from_record(42, 5, payload.encode())
    assert event.frame == f"id: 42\ndata: {payload}\n\n".encode()


def test_a_payload_with_line_breaks_is_framed_line_by_line() -> None:
    event = ExecutionEvent.from_record(7, 1, b'{"a":\n1}')
    assert event.frame == b'id: 7\ndata: {"a":\ndata: 1}\n\n'


def test_a_notification_names_its_event_and_execution() -> None:
    payload = '{"entity_type" : "execution", "entity_id" : 5, "event_id" : 42, "truncated" : true}'
    assert parse_notification(payload) == (42, 5)


@pytest.mark.parametrize(
    ("payload", "kind"),
    [("not json", "not_json"), ("x" * 7999, "not_json"), ("[" * 100_000, "not_json"),
     ("[]", "not_an_event"), ('{"entity_type":"pack","entity_id":1,"event_id":1}', "not_an_event"),
     ('{"entity_type":"execution","entity_id":"1","event_id":1}', "not_an_event"),
     ('{"entity_type":"execution","entity_id":1}', "not_an_event"),
     ('{"entity_type":"execution","entity_id":true,"event_id":1}', "not_an_event"),
     ('{"entity_type":"execution","entity_id":1,"event_id":0}', "not_an_event"),
     ('{"entity_type":"execution","entity_id":1,"event_id":9223372036854775808}', "not_an_event")],
)
def test_notifications_not_from_the_trigger_are_refused_by_kind(payload: str, kind: str) -> None:
    with pytest.raises(PayloadError) as refused:
        parse_notification(payload)
    assert refused.value.kind == kind
