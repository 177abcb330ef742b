"""Stop strings across token boundaries and UTF-8 safe streaming with a real tokenizer."""

import pytest

from worker.text import Detokenizer, StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello", " wor", "ld END", " more"], ["END"], ("Hello world ", True)),
    (["Hel", "lo<", "|st", "op|>", "x"], ["<|stop|>"], ("Hello", True)),
    (["ab", "c"], ["abd"], ("abc", False)),  # a held-back prefix that never completes is emitted
    (["one\n", "\ntwo"], ["\n\n", "two"], ("one", True)),  # the earliest stop wins
    (["x", "y"], [], ("xy", False)),
])
def test_stop_strings(pieces, stops, expected):
    assert feed(StopMatcher(stops), pieces) == expected


def test_the_stop_string_reached_is_named():
    matcher = StopMatcher(["two", "\n\n", "one"])
    assert matcher.matched is None
    assert feed(matcher, ["zero one\n", "\ntwo"]) == ("zero ", True)
    assert matcher.matched == "one"  # the earliest in the text, not in the list
    tie = StopMatcher(["abc", "ab"])
    assert feed(tie, ["xabcd"]) == ("x", True) and tie.matched == "ab"  # at a tie, the shortest


def test_stop_prefix_is_held_back_not_leaked():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("OP tail") == ("", True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from worker.model_source import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 🙂🚀 and 世界, ok", " leading space", "naïve café ☕"])
def test_detokenizer_never_splits_characters(tokenizer, text):
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = Detokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(token) for token in ids]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_multibyte_character_split_over_tokens_is_held(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False).input_ids
    assert len(ids) > 1, "this emoji spans several byte-level tokens"
    detokenizer = Detokenizer(tokenizer, [])
    deltas = [detokenizer.push(token) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"
