"""What the HTTP frontends share as services: HTTPS (certificate options, the TLS context) and the drain."""

from __future__ import annotations

import ssl

from pydantic import Field, FilePath, model_validator
from pydantic_settings import BaseSettings


class HttpServerSettings(BaseSettings):
    """A PEM certificate (chain) and its private key: given both, the server speaks HTTPS only. And how
    long SIGTERM waits for open requests."""

    ssl_certfile: FilePath | None = Field(None, description="PEM certificate chain to serve HTTPS with "
                                                            "(with --ssl-keyfile)")
    ssl_keyfile: FilePath | None = Field(None, description="PEM private key of --ssl-certfile")
    drain_timeout: float = Field(30.0, ge=0, description="on SIGTERM, seconds to let open requests and streams "
                                 "finish (new ones are refused) before exiting")

    @model_validator(mode="after")
    def _files_go_together(self) -> HttpServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.ssl_certfile is None else "https"

    def server_context(self) -> ssl.SSLContext | None:
        """The TLS context to serve with, or None for plain HTTP. A key that does not match the
        certificate fails here, at start, rather than at the first client."""
        if self.ssl_certfile is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 and up, the stdlib's ciphers
        context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context
