"""The terminal chat, typed into like a person would, over the real bus."""

import sys

import pexpect
import pytest

from tests.helpers import TINY_MODEL, serving
from tests.processes import ROOT, stop


@pytest.mark.slow
def test_terminal_chat_streams_cancels_and_resets(default_bus):
    bus = default_bus
    chat = pexpect.spawn(sys.executable, ["-m", "frontends.cli", "--broker", bus.address, "--temperature", "0"],
                         cwd=str(ROOT), encoding="utf-8", timeout=60)
    try:
        chat.expect(f"chat with {bus.model}")
        chat.expect_exact("you> ")
        chat.sendline("/models")
        chat.expect(f"{bus.model}  workers=1 capacity=64")
        chat.expect_exact("you> ")
        chat.sendline("Tell me the capital of France.")
        chat.expect("Paris")
        chat.expect_exact("you> ")
        chat.sendline("Now tell me a very long story about its history.")
        chat.expect_exact(f"{bus.model}> ")
        chat.expect(r"\S")  # the reply streams in
        chat.sendintr()  # Ctrl-C cancels the reply, not the program
        chat.expect_exact("[cancelled]")
        chat.expect_exact("you> ")
        chat.sendline("/system You are terse.")
        chat.expect_exact("(system prompt set; history cleared)")
        chat.sendline("/reset")
        chat.expect_exact("(history cleared)")
        chat.sendline("/model nope")
        chat.sendline("hello")
        chat.expect_exact("[error: model 'nope' is not served")
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_terminal_chat_outlives_its_broker(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL) as bus:
        chat = pexpect.spawn(sys.executable, ["-m", "frontends.cli", "--broker", bus.address],
                             cwd=str(ROOT), encoding="utf-8", timeout=60)
        try:
            chat.expect_exact("you> ")
            stop(bus.broker)
            chat.sendline("/models")
            chat.expect_exact("[error: the broker at")
            chat.expect_exact("you> ")
            chat.sendline("/quit")
            chat.expect(pexpect.EOF)
        finally:
            chat.close(force=True)
        assert chat.exitstatus == 0
