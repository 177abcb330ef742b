"""The API's keys: `--api-keys` (unnamed, no limits) and a TOML keys file, read again when it changes.

    [keys.alice]
    secret = "sk-alice-..."
    requests_per_minute = 60
    tokens_per_minute = 100000
    max_concurrent = 4
    models = ["SmolLM2-135M-Instruct"]
    priority = 1
"""

from __future__ import annotations

import hmac
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from frontends.openai_api.quotas import KeyPolicy

log = logging.getLogger(__name__)

_FIELDS = {"secret", "requests_per_minute", "tokens_per_minute", "max_concurrent", "models", "priority"}


def parse_keys(text: str) -> list[KeyPolicy]:
    """The keys of a keys file's text; ValueError (never naming a secret) when it is not one."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # says where, not what: no secret in the message
        raise ValueError(f"not TOML: {exc}") from None
    unknown = set(document) - {"keys"}
    if unknown:
        raise ValueError(f"unknown top-level entries: {', '.join(sorted(unknown))} (only [keys.NAME] tables)")
    tables = document.get("keys", {})
    if not isinstance(tables, dict):
        raise ValueError("'keys' must be a table of [keys.NAME] tables")
    policies = [_policy(name, table) for name, table in tables.items()]
    secrets = [policy.secret for policy in policies]
    if len(set(secrets)) != len(secrets):
        raise ValueError("two keys have the same secret")
    return policies


def _policy(name: str, table: Any) -> KeyPolicy:
    if not name:  # the empty name is the label of the unnamed --api-keys
        raise ValueError("a key has an empty name")
    if not isinstance(table, dict):
        raise ValueError(f"key '{name}' must be a table")
    unknown = set(table) - _FIELDS
    if unknown:
        raise ValueError(f"key '{name}': unknown fields {', '.join(sorted(unknown))}")
    secret = table.get("secret")
    if not isinstance(secret, str):
        raise ValueError(f"key '{name}': 'secret' (a string) is required")
    models = table.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise ValueError(f"key '{name}': 'models' must be a list of model names")
    return KeyPolicy(name, secret, table.get("requests_per_minute"), table.get("tokens_per_minute"),
                     table.get("max_concurrent"), None if models is None else frozenset(models),
                     table.get("priority", 0))


class KeyRing:
    """The keys in force. `refresh` re-reads the keys file when its stat changed; a file that fails to
    read or parse keeps the last good keys, and says why in the log (once per change)."""

    def __init__(self, keys_file: Path | None, api_keys: list[str]) -> None:
        self._path = keys_file
        self._unnamed = [KeyPolicy("", key) for key in api_keys]
        self._named: list[KeyPolicy] = []
        self._seen: tuple[int, int, int] | None = None  # the stat of the file last read, good or not
        if keys_file is not None:
            self._named = parse_keys(keys_file.read_text())  # at start a broken file is fatal, not kept
            self._seen = _signature(keys_file)

    @property
    def required(self) -> bool:
        """Whether requests need a key: any configured, or a keys file given (even with no keys yet)."""
        return bool(self._unnamed) or self._path is not None

    @property
    def names(self) -> set[str]:
        return {policy.name for policy in self._named}

    def refresh(self) -> bool:
        """Read the keys file again if it changed; True when new keys took effect."""
        if self._path is None:
            return False
        try:
            signature = _signature(self._path)
        except OSError as exc:
            signature = None
            reason = f"cannot read it ({exc.strerror})"
        if signature == self._seen:  # unchanged, or still unreadable: said once already
            return False
        self._seen = signature
        if signature is not None:
            try:
                named = parse_keys(self._path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                reason = str(exc)
            else:
                self._named = named
                log.info("keys file %s read again: %d keys (%s)", self._path, len(named),
                         ", ".join(sorted(self.names)) or "none")
                return True
        log.warning("keys file %s: %s; keeping the %d keys read before", self._path, reason, len(self._named))
        return False

    def match(self, given: list[str]) -> KeyPolicy | None:
        """The key among `given` (values from the request's headers), if any matches."""
        found = None
        # compare with every key, so the time taken says nothing about which one nearly matched
        # (surrogateescape: aiohttp keeps a header's non-UTF-8 bytes as surrogates; such a key is just wrong)
        for value in given:
            presented = value.strip().encode("utf-8", "surrogateescape")
            for policy in [*self._named, *self._unnamed]:
                if hmac.compare_digest(presented, policy.secret.encode()) and found is None:
                    found = policy
        return found


def _signature(path: Path) -> tuple[int, int, int]:
    """What changes when the file is rewritten in place or replaced by a rename."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
