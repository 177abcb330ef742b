"""The keys file: its format, its errors, and reading it again when it changes."""

from __future__ import annotations

import logging
import os

import pytest

from frontends.openai_api.keys import KeyRing, parse_keys

GOOD = """
[keys.alice]
secret = "sk-alice"
requests_per_minute = 60
tokens_per_minute = 1000
max_concurrent = 2
models = ["tiny"]
priority = 3

[keys.bob]
secret = "sk-bob"
"""


def test_a_file_gives_named_keys_with_their_limits():
    alice, bob = sorted(parse_keys(GOOD), key=lambda p: p.name)
    assert (alice.name, alice.secret, alice.requests_per_minute, alice.tokens_per_minute, alice.max_concurrent,
            alice.models, alice.priority) == ("alice", "sk-alice", 60, 1000, 2, frozenset({"tiny"}), 3)
    assert (bob.requests_per_minute, bob.tokens_per_minute, bob.max_concurrent, bob.models, bob.priority) == (
        None, None, None, None, 0)


@pytest.mark.parametrize("text, message", [
    ("[keys.a]\nsecret = ", "not TOML"),
    ('[keys.a]\nsecret = "s"\nrpm = 3', "unknown fields rpm"),
    ("[keys.a]\nrequests_per_minute = 3", "'secret'"),
    ('[keys.a]\nsecret = ""', "must not be empty"),
    ('[keys.a]\nsecret = "s"\nmodels = "tiny"', "'models'"),
    ('[keys.a]\nsecret = "s"\nmax_concurrent = 0', "max_concurrent"),
    ('[keys.a]\nsecret = "s"\n[keys.b]\nsecret = "s"', "same secret"),
    ('[key.a]\nsecret = "s"', "unknown top-level"),
    ('[keys.""]\nsecret = "s"', "empty name"),
])
def test_a_broken_file_says_why_without_its_secrets(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_keys(text)
    assert "sk-" not in str(error.value)


def test_unnamed_keys_and_matching(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(GOOD)
    ring = KeyRing(path, ["plain"])
    assert ring.required
    assert ring.match(["sk-bob"]).name == "bob"
    assert ring.match(["nope", " sk-alice "]).name == "alice"
    assert ring.match(["plain"]).name == ""
    assert ring.match(["k\udcff"]) is None  # a header's undecodable bytes: just a wrong key
    assert ring.match([]) is None
    assert not KeyRing(None, []).required


def test_changes_are_read_and_a_broken_file_keeps_the_last_good_keys(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    path.write_text(GOOD)
    ring = KeyRing(path, [])
    assert not ring.refresh()  # unchanged
    path.write_text('[keys.carol]\nsecret = "sk-carol"\n')
    assert ring.refresh()
    assert ring.names == {"carol"} and ring.match(["sk-alice"]) is None
    with caplog.at_level(logging.WARNING):
        path.write_text('[keys.carol]\nsecret = "sk-carol-2"\nrpm = 1\n')
        assert not ring.refresh()
        assert ring.match(["sk-carol"]).name == "carol"
        assert "unknown fields rpm" in caplog.text and "sk-carol" not in caplog.text
        caplog.clear()
        assert not ring.refresh()  # the same broken file: said once
        assert caplog.text == ""
        os.unlink(path)
        assert not ring.refresh() and "cannot read it" in caplog.text
    assert ring.match(["sk-carol"]).name == "carol"
    replacement = tmp_path / "new.toml"  # replaced by a rename, as editors and config tools do
    replacement.write_text('[keys.dave]\nsecret = "sk-dave"\n')
    os.replace(replacement, path)
    assert ring.refresh() and ring.names == {"dave"}


def test_a_broken_file_at_start_is_fatal(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("[keys.a]\n")
    with pytest.raises(ValueError):
        KeyRing(path, [])
