"""The browser chat over the real bus: gradio_client against its endpoints, and a real Chromium."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest
from gradio_client import Client

from frontends.client import SyncBusClient
from tests.processes import ROOT, free_port, spawn, stop

TOKEN = "open-sesame"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def web(default_bus, tmp_path_factory):
    """The page on a free port, with an access token, for the default model."""
    port = free_port()
    votes = tmp_path_factory.mktemp("web") / "votes.jsonl"
    process = spawn("frontends.web", "--broker", default_bus.address, "--port", str(port), "--auth-token", TOKEN,
                    "--votes-file", str(votes), log_name="web")
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        pytest.fail("the web page never answered")
    yield url, votes
    stop(process)


def in_flight(address: str) -> int:
    # A thread of its own: Playwright's sync API already runs an event loop here.
    with SyncBusClient(address) as client:
        return sum(w.in_flight for w in client.workers())


def test_endpoints_with_gradio_client(web, default_bus):
    url, votes = web
    client = Client(url, verbose=False)
    model = default_bus.model
    history, _ = client.predict("Hi", [], model, "", 0, 1, 16, api_name="/chat")
    assert "Log in" in history[-1]["content"][0]["text"]
    assert "Token incorrect" in client.predict("nope", api_name="/login")
    client.predict(TOKEN, api_name="/login")
    history, box = client.predict("What is the capital of France?", [], model, "", 0, 1, 32, api_name="/chat")
    assert box == "" and "Paris" in history[-1]["content"][0]["text"]
    history, _ = client.predict("Hi", [], "no-such-model", "", 0, 1, 16, api_name="/chat")
    assert "not served" in history[-1]["content"][0]["text"]
    prompt = "Name a color."
    answer_a, answer_b = client.predict(prompt, model, model, 0, 1.0, 24, api_name="/compare")
    assert answer_a and answer_b and not answer_a.startswith("⚠️")
    message = client.predict(prompt, model, model, 0, 1.0, answer_a, answer_b, api_name="/vote_left")
    assert "Recorded" in message
    [vote] = [json.loads(line) for line in votes.read_text().splitlines()]
    assert vote["vote"] == "left" and vote["a"]["answer"] == answer_a and vote["b"]["temperature"] == 1.0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make browser)")
def test_chat_in_a_real_browser(web, default_bus):
    from playwright.sync_api import sync_playwright

    url, _ = web
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        try:
            page.goto(url)
            page.locator("#token input").fill("wrong")
            page.locator("#login-button").click()
            page.get_by_text("Token incorrect").wait_for()
            assert not page.locator("#main").is_visible()
            page.locator("#token input").fill(TOKEN)
            page.locator("#login-button").click()
            page.locator("#main").wait_for(state="visible")

            page.locator("#model input").click()
            page.get_by_role("option", name=default_bus.model).click()
            page.get_by_text("Parameters").click()
            temperature = page.locator("#temperature input[type=number]")
            temperature.fill("0")
            temperature.press("Enter")

            def reply() -> str:
                bots = page.locator('#chatbot [data-testid="bot"]')
                return bots.last.inner_text() if bots.count() else ""

            page.locator("#message textarea").fill("What is the capital of France?")
            page.locator("#message textarea").press("Enter")
            seen = watch(reply, until=lambda: "Paris" in reply() and in_flight(default_bus.address) == 0)
            assert len(seen) >= 3, f"the reply should grow while it streams, saw {seen}"
            assert all(seen[i] in seen[i + 1] or seen[i + 1].startswith(seen[i].rstrip()) for i in range(len(seen) - 1))
            page.screenshot(path=str(artifacts / "web-ui.png"))

            page.locator("#message textarea").fill("Tell me a very long story about a dragon and a knight.")
            page.locator("#message textarea").press("Enter")
            watch(reply, until=lambda: len(reply()) > 40 and "Paris" not in reply())
            page.locator("#stop").click()
            page.wait_for_timeout(500)
            stopped = reply()
            page.wait_for_timeout(1500)
            assert reply() == stopped, "the reply kept growing after Stop"
            assert in_flight(default_bus.address) == 0, "Stop must cancel the request on the bus"

            page.locator("#clear").click()
            page.wait_for_timeout(500)
            assert page.locator('#chatbot [data-testid="bot"]').count() == 0
        finally:
            page.screenshot(path=str(artifacts / "web-ui-last.png"))
            browser.close()


def watch(read, until, timeout: float = 60.0) -> list[str]:
    """Poll `read()` until `until()`; returns each distinct non-empty value seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if value and (not seen or value != seen[-1]):
            seen.append(value)
        if until():
            return seen
        time.sleep(0.03)
    raise TimeoutError(f"condition not reached; saw {seen[-3:]}")
