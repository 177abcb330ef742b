"""Which browser sessions have given the access token."""

from __future__ import annotations

import hmac
import time

import gradio as gr

IDLE_SECONDS = 24 * 3600  # a session unused this long must log in again


class Sessions:
    """Logged-in sessions, kept by the app itself: Gradio's per-session state drops the oldest sessions
    once many are open, and anyone can open sessions, so only a correct token adds one here."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self._last_used: dict[str, float] = {}

    def log_in(self, given: str, request: gr.Request) -> bool:
        if self.token is None or request.session_hash is None:
            return False
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
            return False
        now = time.monotonic()
        self._last_used = {s: t for s, t in self._last_used.items() if now - t < IDLE_SECONDS}
        self._last_used[request.session_hash] = now
        return True

    def allows(self, request: gr.Request) -> bool:
        if self.token is None:
            return True
        session = request.session_hash
        now = time.monotonic()
        if session not in self._last_used or now - self._last_used[session] >= IDLE_SECONDS:
            return False
        self._last_used[session] = now
        return True
