"""The browser chat page: a chat tab, a side-by-side tab, and an optional token login in front."""

from __future__ import annotations

from functools import partial

import gradio as gr

from broker.protocol import TEMPERATURE_RANGE
from frontends.web.arena import VOTES, Arena
from frontends.web.bus import LoopLocalBus
from frontends.web.chat import ChatHandlers
from frontends.web.config import WebSettings
from frontends.web.drain import Drain
from frontends.web.models import ModelList
from frontends.web.sessions import Sessions

# System fonts only: the default theme would fetch web fonts from the internet.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])

# Every event that streams from the bus shares one limit, so it bounds replies across all users.
REPLIES = "replies"
# Votes are recorded one at a time, so two votes can never both claim one comparison.
VOTING = {"concurrency_limit": 1, "concurrency_id": "votes"}


def build_app(settings: WebSettings, drain: Drain | None = None) -> gr.Blocks:
    """The whole page; every handler refuses to talk to the bus until the session has logged in.
    `drain`: counts the replies streaming, and refuses new ones once draining."""
    bus = LoopLocalBus(settings.broker, settings.curve(), drain)
    sessions = Sessions(settings.auth_token)
    chat = ChatHandlers(bus, sessions)
    arena = Arena(bus, sessions, settings.votes_file)
    models = ModelList(bus, sessions)
    streaming = {"concurrency_limit": settings.concurrency_limit, "concurrency_id": REPLIES}
    with gr.Blocks(title="tokenbus chat", analytics_enabled=False) as app:
        with gr.Column(visible=settings.auth_token is not None, elem_id="login") as login_box:
            gr.Markdown("## tokenbus chat\nEnter the access token to start chatting.")
            token = gr.Textbox(label="Access token", type="password", elem_id="token")
            login_button = gr.Button("Log in", variant="primary", elem_id="login-button")
            login_message = gr.Markdown(elem_id="login-message")
        with gr.Column(visible=settings.auth_token is None, elem_id="main") as main_box:
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=[], interactive=True, allow_custom_value=True, scale=4,
                                    elem_id="model")
                refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
            model_status = gr.Markdown(elem_id="model-status")
            with gr.Tab("Chat", elem_id="chat-tab"):
                system = gr.Textbox(label="System prompt", placeholder="You are a helpful assistant.", lines=1,
                                    elem_id="system")
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
                # Disabled until the model list is in: see `unlock_when_listed`.
                message = gr.Textbox(label="Message", placeholder="Type a message and press Enter", interactive=False,
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", interactive=False, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    regenerate = gr.Button("Regenerate", interactive=False, elem_id="regenerate")
                    clear = gr.Button("Clear", interactive=False, elem_id="clear")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(*TEMPERATURE_RANGE, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p", elem_id="top-p")
                    max_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max new tokens", elem_id="max-tokens")
            with gr.Tab("Side by side", elem_id="compare-tab"):
                with gr.Row():
                    model_a = gr.Dropdown(label="Model A", choices=[], interactive=True, allow_custom_value=True)
                    model_b = gr.Dropdown(label="Model B", choices=[], interactive=True, allow_custom_value=True)
                with gr.Row():
                    temperature_a = gr.Slider(*TEMPERATURE_RANGE, value=0.7, step=0.05, label="Temperature A")
                    temperature_b = gr.Slider(*TEMPERATURE_RANGE, value=0.7, step=0.05, label="Temperature B")
                compare_max_tokens = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens")
                prompt = gr.Textbox(label="Prompt", placeholder="One prompt for both", elem_id="prompt")
                with gr.Row():
                    compare = gr.Button("Compare", variant="primary", interactive=False, elem_id="compare")
                    compare_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                with gr.Row():
                    answer_a = gr.Textbox(label="Answer A", lines=8, interactive=False, elem_id="answer-a")
                    answer_b = gr.Textbox(label="Answer B", lines=8, interactive=False, elem_id="answer-b")
                comparison = gr.State(None)  # the finished comparison a vote records; kept on the server
                with gr.Row():
                    vote_buttons = {key: gr.Button(label, elem_id=f"vote-{key}") for key, label in VOTES.items()}
                vote_message = gr.Markdown(elem_id="vote-message")

        dropdowns = [model, model_a, model_b]
        list_models = (models.refresh, dropdowns, [*dropdowns, model_status])
        # A fresh page's dropdowns are empty until the model list arrives: a message sent sooner would go
        # out with no model, or with a max-tokens limit not yet fitted to it, while the page shows the
        # model a moment later. So the controls that send (and Stop and Clear, which unlock Send) start
        # disabled; the first listing fits the sliders itself (the dropdowns' change events would race
        # the unlock), then unlocks a session that may chat; one waiting for its token, after the login.
        waiting = [message, send, stop, regenerate, clear, compare]
        sliders = [max_tokens, compare_max_tokens]

        def fit_sliders(chat_tokens: float, compare_tokens: float, chosen: str, chosen_a: str,
                        chosen_b: str) -> list[dict]:
            return [models.limit_max_tokens(chat_tokens, chosen),
                    models.limit_max_tokens(compare_tokens, chosen_a, chosen_b)]

        def unlock_when_listed(request: gr.Request) -> list[dict]:
            allowed = sessions.allows(request)
            return [gr.update(interactive=True) if allowed else gr.update() for _ in waiting]

        def fit_then_unlock(listing: gr.events.Dependency) -> None:
            listing.then(fit_sliders, [*sliders, *dropdowns], sliders, api_name=False, queue=False).then(
                unlock_when_listed, None, waiting, api_name=False, queue=False)

        # Login: the token is checked on the server and remembered in this browser session only.
        def log_in(given: str, request: gr.Request):
            if not sessions.log_in(given, request):
                return "❌ Token incorrect. Try again.", gr.update(), gr.update()
            return "", gr.update(visible=False), gr.update(visible=True)

        login_outputs = [login_message, login_box, main_box]
        for trigger, name in ((login_button.click, "login"), (token.submit, False)):
            fit_then_unlock(trigger(log_in, token, login_outputs, api_name=name).success(
                *list_models, api_name=False))

        # `then`, not `success`: a failed listing still unlocks, and the empty dropdown says why Send fails.
        fit_then_unlock(app.load(*list_models, api_name=False))
        refresh.click(*list_models, api_name="models")
        model.change(models.limit_max_tokens, [max_tokens, model], max_tokens, api_name=False)
        for dropdown in (model_a, model_b):
            dropdown.change(models.limit_max_tokens, [compare_max_tokens, model_a, model_b], compare_max_tokens,
                            api_name=False)

        # One reply at a time per page: Send, Enter and Regenerate are locked while one streams.
        starters = [send, message, regenerate]

        def locked(locking: bool) -> list[dict]:
            return [gr.update(interactive=not locking) for _ in starters]

        params = [model, system, temperature, top_p, max_tokens]
        replies = ((send.click, chat.respond, [message, chatbot, *params], [chatbot, message], "chat"),
                   (message.submit, chat.respond, [message, chatbot, *params], [chatbot, message], False),
                   (regenerate.click, chat.regenerate, [chatbot, *params], chatbot, "regenerate"))
        reply_events = []
        for trigger, handler, inputs, outputs, name in replies:
            reply = trigger(partial(locked, True), None, starters, api_name=False, queue=False).then(
                handler, inputs, outputs, api_name=name, **streaming)
            reply.then(partial(locked, False), None, starters, api_name=False, queue=False)
            reply_events.append(reply)
        # Cancelling a handler cancels its bus request.
        stop.click(partial(locked, False), None, starters, cancels=reply_events, api_name=False, queue=False)
        clear.click(lambda: ([], ""), None, [chatbot, message], cancels=reply_events, api_name="clear")
        clear.click(partial(locked, False), None, starters, api_name=False, queue=False)

        compare_inputs = [prompt, model_a, model_b, temperature_a, temperature_b, compare_max_tokens]
        compare_event = compare.click(arena.compare, compare_inputs, [answer_a, answer_b, comparison],
                                      api_name="compare", **streaming)
        compare_stop.click(None, cancels=[compare_event])
        for key, button in vote_buttons.items():
            button.click(arena.voter(key), comparison, [vote_message, comparison], api_name=f"vote_{key}", **VOTING)
    return app
