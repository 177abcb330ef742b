"""The one config layer: each process describes its options as a pydantic-settings class.

Command-line flags (kebab-case) are generated from the class, environment variables give the
defaults (`TOKENBUS_<PROCESS>_<FIELD>`), and unknown flags are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from broker.auth import CurveKeys

DEFAULT_BROKER_ADDRESS = "tcp://127.0.0.1:5555"

T = TypeVar("T", bound=BaseSettings)


def cli_config(process: str, prog: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=f"TOKENBUS_{process.upper()}_",
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        extra="forbid",
    )


def load_settings(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Settings from flags (`argv`, default sys.argv[1:]) over environment over defaults."""
    return CliApp.run(cls, cli_args=list(argv) if argv is not None else None)


class BusPeerSettings(BaseSettings):
    """The options every worker and client shares: where the broker is, and its keys when it uses CURVE."""

    curve_key: Path | None = Field(None, description="this peer's CURVE key pair: a .key_secret file from "
                                                     "python -m broker.keys new (with --broker-key)")
    broker_key: Path | None = Field(None, description="the broker's CURVE public key file, broker.key")

    @model_validator(mode="after")
    def _keys_go_together(self) -> BusPeerSettings:
        if (self.curve_key is None) != (self.broker_key is None):
            raise ValueError("--curve-key and --broker-key go together")
        return self

    def curve(self) -> CurveKeys | None:
        """The keys to connect with, or None for a broker without CURVE."""
        return None if self.curve_key is None else CurveKeys.load(self.curve_key, self.broker_key)
