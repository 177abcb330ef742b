"""OpenAI's Responses API (`/v1/responses`): request parsing, the response object and its stream
events, the store of finished responses, and the handlers that join them to the bus."""
