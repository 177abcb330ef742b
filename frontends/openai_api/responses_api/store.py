"""Finished responses kept in the API process, so a client can read one again or continue its
conversation with `previous_response_id`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A finished response and the conversation it ends: the bus messages of its input (instructions
    left out, as they are not carried over) followed by its output."""

    body: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    owner: str | None = None  # the name of the API key that made it: only that key sees it


class ResponseStore:
    """At most `max_entries` responses by id; the oldest goes first when a new one needs room."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: StoredResponse) -> None:
        if self.max_entries == 0:
            return
        self._entries[entry.body["id"]] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str, owner: str | None = None) -> StoredResponse | None:
        """The response, if `owner` (a key's name; None without keys) made it: another key's reads as unknown."""
        entry = self._entries.get(response_id)
        return entry if entry is not None and entry.owner == owner else None

    def remove(self, response_id: str, owner: str | None = None) -> bool:
        if self.get(response_id, owner) is None:
            return False
        del self._entries[response_id]
        return True
