"""Anthropic's Messages API (`/v1/messages`) on the same server and bus as the OpenAI routes."""
