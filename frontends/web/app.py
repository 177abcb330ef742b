"""The browser chat page: a chat tab, a side-by-side tab, and an optional token login in front."""

from __future__ import annotations

import hmac
from functools import partial

import gradio as gr

from frontends.client import BusError
from frontends.web.arena import VOTES, Arena
from frontends.web.bus import LoopLocalBus
from frontends.web.chat import ChatHandlers
from frontends.web.config import WebSettings

# System fonts only: the default theme would fetch web fonts from the internet.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class ModelList:
    """The dropdowns' choices, from the broker: label with live status, value the model name."""

    def __init__(self, bus: LoopLocalBus) -> None:
        self.bus = bus

    async def choices(self) -> tuple[list[tuple[str, str]], str]:
        try:
            infos = await (await self.bus.get()).models()
        except BusError as error:
            return [], f"⚠️ Broker unreachable: {error.message}"
        choices = [(f"{i.name} — {i.workers} worker{'s' * (i.workers != 1)}, {i.in_flight}/{i.capacity} busy", i.name)
                   for i in infos]
        status = f"{len(infos)} model{'s' * (len(infos) != 1)} live" if infos else "⚠️ No model is served right now."
        return choices, status

    async def refresh(self, *current: str) -> list:
        choices, status = await self.choices()
        names = [value for _, value in choices]
        updates = [gr.update(choices=choices, value=value if value in names else (names[0] if names else None))
                   for value in current]
        return [*updates, status]


def build_app(settings: WebSettings) -> gr.Blocks:
    bus = LoopLocalBus(settings.broker)
    chat = ChatHandlers(bus)
    arena = Arena(bus, settings.votes_file)
    models = ModelList(bus)
    with gr.Blocks(title="tokenbus chat", analytics_enabled=False) as app:
        logged_in = gr.State(settings.auth_token is None)
        with gr.Column(visible=settings.auth_token is not None, elem_id="login") as login_box:
            gr.Markdown("## tokenbus chat\nEnter the access token to start chatting.")
            token = gr.Textbox(label="Access token", type="password", elem_id="token")
            login_button = gr.Button("Log in", variant="primary", elem_id="login-button")
            login_message = gr.Markdown(elem_id="login-message")
        with gr.Column(visible=settings.auth_token is None, elem_id="main") as main_box:
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=[], interactive=True, allow_custom_value=True, scale=4, elem_id="model")
                refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
            model_status = gr.Markdown(elem_id="model-status")
            with gr.Tab("Chat"):
                system = gr.Textbox(label="System prompt", placeholder="You are a helpful assistant.", lines=1)
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
                message = gr.Textbox(label="Message", placeholder="Type a message and press Enter", elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top p")
                    max_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max new tokens", elem_id="max-tokens")
            with gr.Tab("Side by side"):
                with gr.Row():
                    model_a = gr.Dropdown(label="Model A", choices=[], interactive=True, allow_custom_value=True)
                    model_b = gr.Dropdown(label="Model B", choices=[], interactive=True, allow_custom_value=True)
                with gr.Row():
                    temperature_a = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature A")
                    temperature_b = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature B")
                compare_max_tokens = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens")
                prompt = gr.Textbox(label="Prompt", placeholder="One prompt for both")
                compare = gr.Button("Compare", variant="primary")
                with gr.Row():
                    answer_a = gr.Textbox(label="Answer A", lines=8, interactive=False)
                    answer_b = gr.Textbox(label="Answer B", lines=8, interactive=False)
                with gr.Row():
                    vote_buttons = {key: gr.Button(label) for key, label in VOTES.items()}
                vote_message = gr.Markdown()

        # Login: the token is checked on the server and remembered in this browser session only.
        def log_in(given: str):
            ok = settings.auth_token is not None and hmac.compare_digest(given.encode(), settings.auth_token.encode())
            if not ok:
                return False, "❌ Token incorrect. Try again.", gr.update(), gr.update()
            return True, "", gr.update(visible=False), gr.update(visible=True)

        login_outputs = [logged_in, login_message, login_box, main_box]
        login_button.click(log_in, token, login_outputs, api_name="login")
        token.submit(log_in, token, login_outputs, api_name=False)

        dropdowns = [model, model_a, model_b]
        app.load(models.refresh, dropdowns, [*dropdowns, model_status], api_name=False)
        refresh.click(models.refresh, dropdowns, [*dropdowns, model_status], api_name="models")

        params = [model, system, temperature, top_p, max_tokens, logged_in]
        reply_events = [
            trigger(chat.respond, [message, chatbot, *params], [chatbot, message], api_name=name)
            for trigger, name in ((send.click, "chat"), (message.submit, False))
        ]
        reply_events.append(regenerate.click(chat.regenerate, [chatbot, *params], chatbot, api_name="regenerate"))
        stop.click(None, cancels=reply_events)  # cancelling the handler cancels its bus request
        clear.click(lambda: ([], ""), None, [chatbot, message], cancels=reply_events, api_name="clear")

        compare_inputs = [prompt, model_a, model_b, temperature_a, temperature_b]
        compare.click(arena.compare, [*compare_inputs, compare_max_tokens, logged_in], [answer_a, answer_b],
                      api_name="compare")
        for key, button in vote_buttons.items():
            button.click(partial(arena.vote, key), [*compare_inputs, answer_a, answer_b, logged_in], vote_message,
                         api_name=f"vote_{key}")
    return app
