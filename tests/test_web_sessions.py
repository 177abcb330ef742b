"""Logged-in sessions are the app's own: only a correct token adds one, and others are not let in."""

from __future__ import annotations

import gradio as gr

from frontends.web.sessions import Sessions


def session(name: str) -> gr.Request:
    return gr.Request(session_hash=name)


def test_only_the_session_that_gave_the_token_is_let_in():
    sessions = Sessions("sesame")
    assert not sessions.allows(session("a"))
    assert not sessions.log_in("wrong", session("a")) and not sessions.allows(session("a"))
    assert sessions.log_in("sesame", session("a"))
    assert sessions.allows(session("a")) and not sessions.allows(session("b"))
    assert not sessions.log_in("sesame", gr.Request()), "a request without a session cannot log in"
    assert not sessions.allows(gr.Request())


def test_anonymous_sessions_never_push_a_logged_in_one_out():
    sessions = Sessions("sesame")
    sessions.log_in("sesame", session("a"))
    for index in range(20_000):
        sessions.allows(session(f"anonymous-{index}"))
    assert sessions.allows(session("a"))


def test_without_a_token_every_session_is_in_and_none_can_log_in():
    sessions = Sessions(None)
    assert sessions.allows(session("a")) and sessions.allows(gr.Request())
    assert not sessions.log_in("", session("a"))
