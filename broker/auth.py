"""Who may speak on the bus: CURVE key pairs, and the broker's allowlist of public keys with roles.

A key folder (`--keys-dir`) holds the broker's own pair (`broker.key`, `broker.key_secret`) and one
allowlist folder per role, `workers/` and `clients/`, of public key files as `zmq.auth` writes them.
The folders are read again whenever they change, so adding or removing a key needs no restart.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

BROKER_KEY_NAME = "broker"
ZAP_DOMAIN = "tokenbus"
_RELOAD_INTERVAL = 0.5  # seconds between looks at the allowlist folders' modification times
_REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings about one refused key (peers retry every 100 ms)


class Role(str, enum.Enum):
    """What a key may do: a worker announces and serves; a client only sends requests."""

    WORKER = "worker"
    CLIENT = "client"

    @property
    def folder(self) -> str:
        return f"{self.value}s"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A peer's own key pair and, for workers and clients, the broker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, secret_file: Path, broker_public_file: Path | None = None) -> CurveKeys:
        """From a `.key_secret` file (which holds both halves) and the broker's `.key` file."""
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key: pass the .key_secret file")
        server_public = zmq.auth.load_certificate(broker_public_file)[0] if broker_public_file else None
        return cls(public, secret, server_public)


class AllowList:
    """Public keys per role, read from the key folder; cheap to ask, reloaded when a folder changes."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._lock = threading.Lock()  # asked from the authenticator's thread and the broker's
        self._roles: dict[bytes, Role] = {}
        self._stamp: tuple[float, ...] | None = None
        self._checked_at = -float("inf")
        for role in Role:
            (keys_dir / role.folder).mkdir(parents=True, exist_ok=True)
        self._reload_if_changed()

    def role_of(self, public_key_z85: bytes) -> Role | None:
        """The role of a key (in Z85 text, as ZeroMQ reports it), or None when it is not allowed."""
        self._reload_if_changed()
        with self._lock:
            return self._roles.get(public_key_z85)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < _RELOAD_INTERVAL:
            return
        self._checked_at = now
        folders = [self.keys_dir / role.folder for role in Role]
        stamp = tuple(f.stat().st_mtime_ns if f.is_dir() else 0 for f in folders)
        if stamp == self._stamp:
            return
        roles = {}
        for role, folder in zip(Role, folders):
            for key_file in sorted(folder.glob("*.key")) if folder.is_dir() else ():
                try:
                    public, _ = zmq.auth.load_certificate(key_file)
                except (OSError, ValueError) as exc:
                    log.warning("ignoring unreadable key file %s: %s", key_file, exc)
                    continue
                roles[public] = role
        with self._lock:
            if self._stamp is not None and roles != self._roles:
                log.info("allowlist reloaded: %d worker keys, %d client keys",
                         sum(r is Role.WORKER for r in roles.values()), sum(r is Role.CLIENT for r in roles.values()))
            self._roles, self._stamp = roles, stamp


class BusAuthenticator:
    """libzmq's ZAP handler (pyzmq's thread authenticator) admitting the allowlist's keys."""

    def __init__(self, context: zmq.Context, allowlist: AllowList) -> None:
        self.allowlist = allowlist
        self._warned: dict[bytes, float] = {}
        self._thread = ThreadAuthenticator(context)
        self._thread.start()
        self._thread.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, public_key_z85: bytes) -> bool:
        """Asked by the authenticator at each CURVE handshake."""
        allowed = self.allowlist.role_of(public_key_z85) is not None
        now = time.monotonic()
        if not allowed and now - self._warned.get(public_key_z85, -float("inf")) > _REFUSAL_LOG_INTERVAL:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned[public_key_z85] = now
            log.warning("refused a connection with a key not in the allowlist: %s",
                        public_key_z85.decode(errors="replace"))
        return allowed

    def stop(self) -> None:
        self._thread.stop()


def broker_keys(keys_dir: Path) -> CurveKeys:
    return CurveKeys.load(keys_dir / f"{BROKER_KEY_NAME}.key_secret")
