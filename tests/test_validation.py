"""The parsers of what a request says (http/validation.py, the path's id converter), fuzzed with hypothesis.

Each input is refused with a 400 (BadRequest, or werkzeug's for a path) or
accepted as what PostgreSQL can store: never another exception, which the
server would answer with a 500. These would have found a Last-Event-ID of
4,301 digits (Python will not convert it) and a ref ending in a line break
(``$`` matches before one).
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import BadRequest as PathBadRequest

from attune_sse.core.event import MAX_BIGINT
from attune_sse.errors import BadRequest
from attune_sse.http.io import IdConverter
from attune_sse.http.validation import MAX_ID_DIGITS, is_pack_ref, pack_of_action_ref, parse_int

DIGITS = st.text(alphabet=string.digits, min_size=1, max_size=6000)
ANY_TEXT = st.one_of(st.text(max_size=300), DIGITS, st.from_regex(r"\s*[0-9]+\s*\n?", fullmatch=True))


@settings(max_examples=500, deadline=None)
@given(raw=ANY_TEXT, minimum=st.sampled_from([0, 1]))
@example(raw="9" * 4301, minimum=0)
@example(raw="0" * 30 + "1", minimum=1)
@example(raw="٣", minimum=1)
def test_parse_int_accepts_a_bigint_in_range_or_says_400(raw: str, minimum: int) -> None:
    try:
        value = parse_int(raw, "Last-Event-ID", minimum=minimum)
    except BadRequest as exc:
        assert exc.status == 400 and exc.code == "VALIDATION_ERROR"
        assert len(exc.message) < 200, "the message quotes at most the first 40 characters"
        return
    assert minimum <= value <= MAX_BIGINT
    assert raw.strip().isascii() and len(raw.strip()) <= MAX_ID_DIGITS


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(DIGITS, st.text(max_size=40)))
@example(raw="1" * 20)
def test_a_path_id_is_at_most_19_ascii_digits_or_400(raw: str) -> None:
    converter = IdConverter(None)  # type: ignore[arg-type]
    try:
        value = converter.to_python(raw) if raw.isascii() and raw.isdigit() else None
    except PathBadRequest as exc:
        assert exc.code == 400 and len(raw) > MAX_ID_DIGITS
        return
    if value is not None:
        assert len(raw) <= MAX_ID_DIGITS and value == int(raw)


@settings(max_examples=1000, deadline=None)
@given(ref=st.one_of(st.text(max_size=40), st.from_regex(r"[a-z][a-z0-9_-]+(\.[A-Za-z0-9_.-]+)?\s?", fullmatch=True)))
@example(ref="core\n")
@example(ref="core.local\n")
def test_refs_match_in_full(ref: str) -> None:
    allowed = set(string.ascii_lowercase + string.digits + "_-")
    if is_pack_ref(ref):
        assert len(ref) >= 2 and ref[0] in string.ascii_lowercase and set(ref) <= allowed
    pack = pack_of_action_ref(ref)
    if pack is not None:
        assert is_pack_ref(pack) and ref.startswith(pack + ".")
        assert set(ref) <= set(string.ascii_letters + string.digits + "_.-"), "no line break, no space"


@pytest.mark.parametrize("ref", ["core\n", "core\r\n", "Core", "c", "core pack", "core\u00e9"])
def test_what_is_not_a_pack_ref(ref: str) -> None:
    assert not is_pack_ref(ref)


@pytest.mark.parametrize("ref", ["core.local\n", "core.local\r\n", "core.", ".local", "core", "Core.local"])
def test_what_is_not_an_action_ref(ref: str) -> None:
    assert pack_of_action_ref(ref) is None
