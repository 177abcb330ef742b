"""The one config layer: each process describes its options as a pydantic-settings class.

Command-line flags (kebab-case) are generated from the class, environment variables give the
defaults (`TOKENBUS_<PROCESS>_<FIELD>`), and unknown flags are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

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
