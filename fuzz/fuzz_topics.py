"""Fuzz glob matching, ACLs and topic validity against a reference matcher.

Input layout: split at the first NUL into a pattern and a topic (UTF-8 with
surrogateescape). The pattern is also cut at ``|`` into allow patterns and, after a
``!``, deny patterns for an ACL. Any disagreement with the quadratic reference
matcher is a failure (AssertionError).
"""

from __future__ import annotations

from wse_proto import topics

SEEDS: list[bytes] = [
    b"chat.*\x00chat.room",
    b"??\x00\xc3\xa9",
    b"*a*a*a*b\x00" + b"a" * 64,
    b"a*|b?!a?\x00a*",
    b"**\x00",
    b"\x00",
    b"[ab]\\*\x00[ab]\\xyz",
    b"t????\x00t\xc3\xa9\xc3\xa9",
    b"*\xf0\x9f\x98\x80?\x00x\xf0\x9f\x98\x80y",
]


def _reference(pattern: bytes, topic: bytes) -> bool:
    row = [True] + [False] * len(topic)
    for c in pattern:
        if c == 0x2A:
            new = [row[0]]
            for j in range(1, len(topic) + 1):
                new.append(row[j] or new[j - 1])
        else:
            new = [False]
            for j in range(1, len(topic) + 1):
                new.append(row[j - 1] and (c == 0x3F or c == topic[j - 1]))
        row = new
    return row[-1]


def target(data: bytes) -> None:
    raw_pattern, _, raw_topic = data.partition(b"\x00")
    pattern = raw_pattern.decode("utf-8", "surrogateescape")
    topic = raw_topic.decode("utf-8", "surrogateescape")
    got = topics.glob_match(pattern, topic)
    want = _reference(topics.topic_bytes(pattern), topics.topic_bytes(topic))
    assert got is want, (pattern, topic, got)
    assert topics.is_glob(topic) is ("*" in topic or "?" in topic)
    assert topics.valid_topic(topic) in (True, False)
    allow_text, _, deny_text = pattern.partition("!")
    allow = [p for p in allow_text.split("|") if p]
    deny = [p for p in deny_text.split("|") if p]
    acl = topics.TopicACL(allow, deny)
    denied = any(topics.glob_match(p, topic) for p in deny)
    allowed = not denied and (not allow or any(topics.glob_match(p, topic) for p in allow))
    assert acl.is_allowed(topic) is allowed
