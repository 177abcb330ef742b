"""The quota limiter on its own: made-up times, no sockets."""

from __future__ import annotations

import pytest

from frontends.openai_api.quotas import WINDOW, KeyPolicy, QuotaLimiter


def test_requests_per_minute_slide_and_say_when_a_slot_frees():
    policy = KeyPolicy("alice", "s", requests_per_minute=2)
    limiter = QuotaLimiter()
    for now in (0.0, 10.0):
        assert limiter.admit(policy, now) is None
        limiter.release(policy, 0, now + 1)
    refusal = limiter.admit(policy, 20.0)
    assert refusal is not None and refusal.retry_after == pytest.approx(WINDOW - 20.0)  # the request at 0 leaves
    assert limiter.admit(policy, WINDOW + 0.5) is None  # it left: one slot
    assert limiter.admit(policy, WINDOW + 1.0).retry_after == pytest.approx(9.0)  # the one at 10 leaves at 70


def test_tokens_count_when_a_request_ends_and_refuse_while_over():
    policy = KeyPolicy("bob", "s", tokens_per_minute=100)
    limiter = QuotaLimiter()
    assert limiter.admit(policy, 0.0) is None
    assert limiter.admit(policy, 1.0) is None  # the first one's tokens are not known yet
    limiter.release(policy, 70, 5.0)
    assert limiter.admit(policy, 6.0) is None  # 70 < 100
    limiter.release(policy, 40, 8.0)  # the second one: 110 in the window
    limiter.release(policy, 10, 9.0)  # the third: 120
    refusal = limiter.admit(policy, 10.0)
    # under 100 again once the 70 ending at 5 leaves (120 - 70 = 50)
    assert refusal is not None and refusal.retry_after == pytest.approx(5.0 + WINDOW - 10.0)
    assert "tokens per minute" in refusal.reason
    assert limiter.admit(policy, 5.0 + WINDOW + 0.1) is None


def test_at_the_token_limit_nothing_is_left():
    policy = KeyPolicy("bob", "s", tokens_per_minute=50)
    limiter = QuotaLimiter()
    limiter.admit(policy, 0.0)
    limiter.release(policy, 50, 1.0)
    assert limiter.admit(policy, 2.0) is not None


def test_concurrency_frees_when_a_request_ends():
    policy = KeyPolicy("carol", "s", max_concurrent=1)
    limiter = QuotaLimiter()
    assert limiter.admit(policy, 0.0) is None
    refusal = limiter.admit(policy, 0.1)
    assert refusal is not None and refusal.retry_after > 0 and "at once" in refusal.reason
    limiter.release(policy, 5, 0.2)
    assert limiter.admit(policy, 0.3) is None


def test_a_refused_request_takes_no_slot():
    policy = KeyPolicy("dave", "s", requests_per_minute=1)
    limiter = QuotaLimiter()
    assert limiter.admit(policy, 0.0) is None
    for now in (1.0, 2.0, 3.0):
        assert limiter.admit(policy, now) is not None
    assert limiter.admit(policy, WINDOW + 0.01) is None


def test_keys_are_counted_apart_and_usage_survives_a_reload_by_name():
    alice, bob = KeyPolicy("alice", "a", requests_per_minute=1), KeyPolicy("bob", "b", requests_per_minute=1)
    limiter = QuotaLimiter()
    assert limiter.admit(alice, 0.0) is None
    assert limiter.admit(bob, 0.0) is None
    limiter.keep_only({"alice", "bob"})
    reloaded = KeyPolicy("alice", "a2", requests_per_minute=1)  # same name, new secret
    assert limiter.admit(reloaded, 1.0) is not None
    limiter.release(bob, 0, 1.0)
    limiter.keep_only({"alice"})  # bob is gone, and forgotten
    assert limiter.admit(bob, 2.0) is None


def test_no_limits_admit_everything():
    policy = KeyPolicy("open", "s")
    limiter = QuotaLimiter()
    assert all(limiter.admit(policy, float(i)) is None for i in range(1000))
    assert limiter.num_open("open") == 1000


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute", "max_concurrent"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=field):
        KeyPolicy("k", "s", **{field: value})


def test_a_policy_never_shows_its_secret():
    policy = KeyPolicy("k", "sk-very-secret", models=frozenset({"m"}))
    assert "sk-very-secret" not in repr(policy)
    assert policy.may_use("m") and not policy.may_use("other")
    assert KeyPolicy("k", "s").may_use("anything")


def test_a_keys_priority_is_its_requests_default_and_their_earliest_place():
    from aiohttp.test_utils import make_mocked_request

    from broker.protocol import GenerationRequest
    from frontends.openai_api.access import with_priority
    from frontends.openai_api.context import KEY

    request = make_mocked_request("POST", "/v1/chat/completions")
    plain = GenerationRequest("m", prompt="hi")
    urgent = GenerationRequest("m", prompt="hi", priority=-9)
    assert with_priority(request, plain) is plain and with_priority(request, urgent) is urgent  # no keys: as sent
    request[KEY] = KeyPolicy("batch", "s", priority=5)
    assert with_priority(request, plain).priority == 5
    assert with_priority(request, urgent).priority == 5  # no jumping ahead of its key
    assert with_priority(request, GenerationRequest("m", prompt="hi", priority=7)).priority == 7  # waiting longer
