"""Topic globs, ACLs and validity (wse_proto.topics), against independent references."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wse_proto import errors, topics


def reference_match(pattern: str, topic: str) -> bool:
    """Textbook dynamic programme over the UTF-8 bytes (quadratic, obviously correct)."""
    p = pattern.encode("utf-8", "surrogatepass")
    t = topic.encode("utf-8", "surrogatepass")
    # row[j]: does p[:i] match t[:j]
    row = [True] + [False] * len(t)
    for c in p:
        if c == ord("*"):
            new = [row[0]]
            for j in range(1, len(t) + 1):
                new.append(row[j] or new[j - 1])
        else:
            new = [False]
            for j in range(1, len(t) + 1):
                new.append(row[j - 1] and (c == ord("?") or c == t[j - 1]))
        row = new
    return row[len(t)]


def regex_match(pattern: str, topic: str) -> bool:
    """Second reference: the pattern translated to a bytes regex."""
    body = b"".join(
        b".*" if c == ord("*") else b"." if c == ord("?") else re.escape(bytes((c,)))
        for c in pattern.encode("utf-8", "surrogatepass")
    )
    return re.fullmatch(body, topic.encode("utf-8", "surrogatepass"), re.DOTALL) is not None


# Small alphabets make matches likely; multi-byte characters exercise byte-wise '?'.
PATTERN_CHARS = st.sampled_from(["a", "b", ".", "*", "?", "é", "中", "😀", "[", "\\"])
TOPIC_CHARS = st.sampled_from(["a", "b", ".", "é", "中", "😀", "*", "?", "[", "\\"])
patterns = st.text(PATTERN_CHARS, max_size=10)
topic_texts = st.text(TOPIC_CHARS, max_size=12)


@settings(max_examples=600)
@given(patterns, topic_texts)
def test_glob_agrees_with_dynamic_programme(pattern: str, topic: str) -> None:
    assert topics.glob_match(pattern, topic) is reference_match(pattern, topic)


@settings(max_examples=300)
@given(patterns, topic_texts)
def test_glob_agrees_with_regex_translation(pattern: str, topic: str) -> None:
    assert topics.glob_match(pattern, topic) is regex_match(pattern, topic)


ANY_TEXT = st.text(
    st.characters() | st.characters(categories=["Cs"]) | st.sampled_from("*?é"), max_size=20
)


@settings(max_examples=200)
@given(ANY_TEXT, ANY_TEXT)
def test_glob_on_arbitrary_text_including_surrogates(pattern: str, topic: str) -> None:
    assert topics.glob_match(pattern, topic) is reference_match(pattern, topic)


@settings(max_examples=200)
@given(topic_texts)
def test_literal_pattern_is_byte_equality(topic: str) -> None:
    literal = topic.replace("*", "x").replace("?", "y")
    assert topics.glob_match(literal, topic) is (literal == topic)
    assert topics.glob_match("*", topic)
    assert topics.glob_match("?" * len(topic.encode()), topic)
    assert not topics.glob_match("?" * (len(topic.encode()) + 1), topic)


@settings(max_examples=200)
@given(topic_texts, topic_texts)
def test_prefix_and_suffix_stars(a: str, b: str) -> None:
    a = a.replace("*", "").replace("?", "")
    assert topics.glob_match(a + "*", a + b)
    assert topics.glob_match("*" + a, b + a)
    assert topics.glob_match("*" + a + "*", b + a + b)


def test_question_mark_is_one_byte() -> None:
    assert not topics.glob_match("?", "é")
    assert topics.glob_match("??", "é")
    assert topics.glob_match("x????", "x😀")


def test_hostile_patterns_stay_fast() -> None:
    """Backtracking matchers take exponential or high-polynomial time on these."""
    topic = "a" * 20_000
    hostile = ["*a" * 30 + "*b", "*a?" * 20 + "*b", "a*" * 40 + "b", "*" + "?a" * 50 + "*b"]
    start = time.perf_counter()
    for _ in range(20):
        for pattern in hostile:
            assert not topics.glob_match(pattern, topic)
    # Linear-ish: well under a second on a loaded machine (a naive matcher never finishes).
    assert time.perf_counter() - start < 5.0


def test_compiled_patterns_are_cached() -> None:
    assert topics.compile_glob("news.*") is topics.compile_glob("news.*")
    pat = topics.compile_glob("caf?*")
    assert pat.match_bytes(b"cafe au lait")
    assert not pat.match("caf")
    assert repr(pat) == "GlobPattern('caf?*')"


@pytest.mark.parametrize(
    ("topic", "glob"),
    [("a", False), ("a*", True), ("?", True), ("", False), ("a.b", False)],
)
def test_is_glob(topic: str, glob: bool) -> None:
    assert topics.is_glob(topic) is glob


def reference_allowed(allow: list[str], deny: list[str], topic: str) -> bool:
    if any(reference_match(p, topic) for p in deny):
        return False
    return not allow or any(reference_match(p, topic) for p in allow)


@settings(max_examples=300)
@given(st.lists(patterns, max_size=3), st.lists(patterns, max_size=3), topic_texts)
def test_acl_rule(allow: list[str], deny: list[str], topic: str) -> None:
    acl = topics.TopicACL(allow, deny)
    assert acl.is_allowed(topic) is reference_allowed(allow, deny, topic)
    assert acl.allow == tuple(allow)
    assert acl.deny == tuple(deny)


def test_acl_checks_pattern_subscriptions_literally() -> None:
    acl = topics.TopicACL(deny=["a?"])
    assert not acl.is_allowed("a*")  # '?' matches the literal '*' of the subscription
    assert acl.is_allowed("abc")
    assert topics.TopicACL(allow=["a*"]).is_allowed("a?")


def test_acl_value_semantics() -> None:
    a = topics.TopicACL(["x*"], ["x.secret"])
    b = topics.TopicACL(("x*",), ("x.secret",))
    assert a == b
    assert hash(a) == hash(b)
    assert topics.TopicACL() == topics.TopicACL([], [])
    assert topics.TopicACL(None, None).is_allowed("anything")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("allow", "deny"),
    [(["a", 5], []), ([], [b"x"]), ("abc", []), ([], "a")],
)
def test_acl_rejects_bad_entries(allow: Any, deny: Any) -> None:
    with pytest.raises(errors.LocalProtocolError):
        topics.TopicACL(allow, deny)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({}, optional={"allow": json_values, "deny": json_values}),
    )
)
def test_acl_from_claim_never_raises(claim: Any) -> None:
    acl = topics.TopicACL.from_claim(claim)
    if not isinstance(claim, dict):
        assert acl is None
        return
    assert acl is not None
    for name, kept in (("allow", acl.allow), ("deny", acl.deny)):
        items = claim.get(name)
        expected = [v for v in items if isinstance(v, str)] if isinstance(items, list) else []
        assert list(kept) == expected


CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}


@settings(max_examples=400)
@given(ANY_TEXT)
def test_valid_topic_means_no_ascii_control(topic: str) -> None:
    has_surrogate = any("\ud800" <= c <= "\udfff" for c in topic)
    assert topics.valid_topic(topic) is (not (set(topic) & CONTROL) and not has_surrogate)


@settings(max_examples=100)
@given(st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3), st.text(max_size=5))
def test_lone_surrogates_are_invalid_but_matchable(surrogates: str, rest: str) -> None:
    topic = rest + surrogates
    assert not topics.valid_topic(topic)
    assert topics.topic_bytes(topic) == topic.encode("utf-8", "surrogatepass")
    assert topics.glob_match("*", topic)
    assert topics.glob_match(topic, topic)
