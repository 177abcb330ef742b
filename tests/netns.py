"""Several hosts on one machine: Linux network namespaces on one virtual switch.

Each host is a namespace with one veth link to a bridge in a "switch" namespace, and an address
from 192.0.2.0/24 (TEST-NET-1, reserved for documentation): the traffic stays between namespaces
this module made, and never reaches a real network. Processes run on a host through
`ip netns exec`; the test's own sockets go there from threads that enter the host's namespace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SUBNET_PREFIX = "192.0.2."
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the iproute2 `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"tbprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip()}"
    try:
        _ip("netns", "exec", probe, "true")
        with ThreadPoolExecutor(1) as thread:
            thread.submit(enter, probe).result()
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot run in a network namespace: {getattr(exc, 'stderr', None) or exc}"
    finally:
        _ip("netns", "delete", probe)
    return None


def enter(namespace: str) -> None:
    """Move the calling thread (only it) into a named network namespace."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    port_name: str  # its link's end on the switch

    @property
    def run_command(self) -> tuple[str, ...]:
        """The prefix that runs a command on this host."""
        return ("ip", "netns", "exec", self.namespace)

    def threads(self, count: int = 1) -> ThreadPoolExecutor:
        """Threads whose sockets live on this host (a ZeroMQ context must be made in them, too)."""
        return ThreadPoolExecutor(count, thread_name_prefix=self.namespace, initializer=enter,
                                  initargs=(self.namespace,))


class Network:
    """A switch and the hosts plugged into it; `close` deletes every namespace it made."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.switch = f"{tag}-switch"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except subprocess.CalledProcessError:
            self.close()
            raise

    def add_host(self, name: str, last_octet: int) -> Host:
        host = Host(f"{self.tag}-{name}", f"{SUBNET_PREFIX}{last_octet}", f"to-{name}"[:15])
        _ip("netns", "add", host.namespace)
        self.hosts.append(host)  # from here on, `close` deletes it
        _ip("-n", self.switch, "link", "add", host.port_name, "type", "veth", "peer", "name", "eth0",
            "netns", host.namespace)
        _ip("-n", self.switch, "link", "set", host.port_name, "master", "br0", "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Unplug the host's cable at the switch: its packets go nowhere, and no side is told."""
        _ip("-n", self.switch, "link", "set", host.port_name, "down")

    def reconnect(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port_name, "up")

    def close(self) -> None:
        for namespace in [*(host.namespace for host in self.hosts), self.switch]:
            subprocess.run(["ip", "netns", "delete", namespace], check=False, capture_output=True, timeout=30)
