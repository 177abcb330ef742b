"""The browser chat in a real Chromium over the real bus, with the default model and the tiny one."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable

import pytest

from frontends.client import SyncBusClient
from frontends.web.chat import EMPTY_REPLY
from tests.helpers import TINY_MODEL
from tests.processes import ROOT, running_web

TOKEN = "open-sesame"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="Debian's chromium is not installed (make browser)")]


@pytest.fixture(scope="module")
def page_url(default_bus):
    """The page on a free port, with an access token, for the default model."""
    with running_web(default_bus.address, "--auth-token", TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_page_urls(bus):
    """(open page, page behind the access token) for the tiny model, each in a fresh web process."""
    with running_web(bus.address) as open_url, running_web(bus.address, "--auth-token", TOKEN) as token_url:
        yield open_url, token_url


class HeldModelLists:
    """Holds a page's requests for the model list until released, as a slow link would; they are the
    queued calls that carry the three model dropdowns' values, still empty on a fresh page."""

    PATTERN = "**/gradio_api/queue/join*"

    def __init__(self, page) -> None:
        self.page = page
        self.held: list = []
        page.route(self.PATTERN, self._route)

    def _route(self, route) -> None:
        if json.loads(route.request.post_data or "{}").get("data") == [None, None, None]:
            self.held.append(route)
        else:
            route.continue_()

    def wait(self, timeout_ms: float = 60_000) -> None:
        """Until the page has asked for the model list."""
        waited = 0
        while not self.held:
            assert waited < timeout_ms, "the page never asked for the model list"
            self.page.wait_for_timeout(30)  # lets Playwright run the route handler
            waited += 30

    def release(self) -> None:
        for route in self.held:
            route.continue_()
        self.page.unroute(self.PATTERN)


def in_flight(address: str) -> int:
    # A client of its own per call: Playwright's sync API already runs an event loop in this thread.
    with SyncBusClient(address) as client:
        return sum(w.in_flight for w in client.workers())


def set_number(page, element: str, value: str, attempts: int = 3) -> None:
    """Type `value` into a Gradio slider's number box until its range input shows it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        box = page.locator(f"{element} input[type=number]")
        box.fill(value)
        box.press("Enter")
        try:
            page.wait_for_function(f"document.querySelector('{element} input[type=range]').value === '{value}'",
                                   timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def watch(read: Callable[[], str], until: Callable[[], bool], timeout: float = 60.0) -> list[str]:
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


def test_chat_in_a_real_browser(page_url, default_bus):
    from playwright.sync_api import expect, sync_playwright

    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        try:
            page.goto(page_url)
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
            # The slider takes the typed value once the page has handled it: only then is the reply greedy.
            # A page still settling may drop the first entry; typing it again is what a user would do.
            set_number(page, "#temperature", "0")

            def reply() -> str:
                # all_inner_texts never waits: the last reply may vanish between a count and a read.
                texts = page.locator('#chatbot [data-testid="bot"]').all_inner_texts()
                return texts[-1] if texts else ""

            page.locator("#message textarea").fill("Tell me the capital of France.")
            page.locator("#message textarea").press("Enter")
            seen = watch(reply, until=lambda: "Paris" in reply() and in_flight(default_bus.address) == 0)
            assert all(later.startswith(earlier.rstrip()) for earlier, later in zip(seen, seen[1:]))
            page.screenshot(path=str(artifacts / "web-ui.png"))

            # A long reply streams for seconds (a short one may come whole at the engine's speed).
            answer = reply()
            page.locator("#message textarea").fill("Tell me a very long story about a dragon and a knight.")
            page.locator("#message textarea").press("Enter")
            seen = watch(reply, until=lambda: len(reply()) > 120 and "Paris" not in reply())
            story = [text for text in seen if text != answer]  # the last reply until the new one shows
            assert len(story) >= 3, f"the reply should grow while it streams, saw {story}"
            assert all(later.startswith(earlier.rstrip()) for earlier, later in zip(story, story[1:]))
            assert page.locator("#send").is_disabled() and page.locator("#regenerate").is_disabled(), \
                "one reply at a time: a second would race the first"
            page.locator("#stop").click()
            expect(page.locator("#regenerate")).to_be_enabled()
            watch(reply, until=lambda: in_flight(default_bus.address) == 0, timeout=10)
            stopped = reply()
            page.wait_for_timeout(1500)
            assert reply() == stopped, "the reply kept growing after Stop"

            page.locator("#clear").click()
            watch(reply, until=lambda: page.locator('#chatbot [data-testid="bot"]').count() == 0, timeout=10)
        finally:
            page.screenshot(path=str(artifacts / "web-ui-last.png"))
            browser.close()


def test_a_message_sent_at_once_goes_to_the_model_the_dropdown_shows(tiny_page_urls, bus):
    from playwright.sync_api import sync_playwright

    open_url, token_url = tiny_page_urls
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            # (page, log in first, hold the model list): the first page of a fresh web process is the one
            # whose list comes slowest; the held lists make "sent before the list arrived" certain.
            for url, logs_in, holds in ((open_url, False, False), (open_url, False, True), (token_url, True, True)):
                page = browser.new_page()
                held = HeldModelLists(page) if holds else None
                page.goto(url)
                if logs_in:
                    page.locator("#token input").fill(TOKEN)
                    page.locator("#login-button").click()
                    page.locator("#main").wait_for(state="visible")
                if held:
                    held.wait()
                    page.locator("#send").wait_for()
                    waiting = {name: page.locator(name).is_disabled()
                               for name in ("#message textarea", "#send", "#regenerate")}
                    assert all(waiting.values()), f"usable before the model list arrived: {waiting}"
                    held.release()

                # Typed and sent at once, the dropdown untouched: Playwright waits only while Send is disabled.
                page.locator("#message textarea").fill("Hello there")
                page.locator("#send").click()
                bot = page.locator('#chatbot [data-testid="bot"]')

                def reply() -> str:
                    texts = bot.all_inner_texts()
                    return texts[-1] if texts else ""

                watch(reply, until=lambda: reply().strip() != "" and in_flight(bus.address) == 0)
                answer = reply()
                # Every note the chat shows (no model selected, context too long, ...) starts with ⚠️; the
                # tiny model's random weights may write only blank lines, which is still an answer from it.
                answered = "⚠️" not in answer or EMPTY_REPLY in answer
                assert answered, f"{url} (logs in: {logs_in}, list held: {holds}) answered {answer!r}"
                shown = page.locator("#model input").input_value()
                assert shown.startswith(f"{TINY_MODEL} — 1 worker"), shown
                page.close()
        finally:
            browser.close()
