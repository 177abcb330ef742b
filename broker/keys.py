"""python -m broker.keys: make and revoke the bus's CURVE keys.

    python -m broker.keys init                          # the broker's own pair, once
    python -m broker.keys new gpu-host-1 --role worker  # a pair for a worker host, allowed at once
    python -m broker.keys new api-host --role client
    python -m broker.keys remove gpu-host-1             # no longer allowed (running broker included)
    python -m broker.keys list

Pairs are written by `zmq.auth.create_certificates` into `<dir>/issued/`; the public half of each
is copied into the allowlist folder of its role (`<dir>/workers/` or `<dir>/clients/`), which a
running broker reads again when it changes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import zmq.auth

from broker.auth import BROKER_KEY_NAME, Role

DEFAULT_DIR = Path("keys")


def init(keys_dir: Path) -> None:
    secret = keys_dir / f"{BROKER_KEY_NAME}.key_secret"
    if secret.exists():
        raise SystemExit(f"{secret} exists already; remove it first to make a new broker key")
    keys_dir.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(keys_dir, BROKER_KEY_NAME)
    for role in Role:
        (keys_dir / role.folder).mkdir(exist_ok=True)
    print(f"broker key pair: {secret}  (keep it on the broker host)")
    print(f"broker public key: {keys_dir / (BROKER_KEY_NAME + '.key')}  (copy it to every worker and client host)")


def new(keys_dir: Path, name: str, role: Role) -> None:
    if name == BROKER_KEY_NAME or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"invalid key name {name!r}: use letters, digits, - and _ (and not {BROKER_KEY_NAME!r})")
    issued = keys_dir / "issued"
    if (issued / f"{name}.key").exists():
        raise SystemExit(f"a key named {name!r} exists already in {issued}")
    issued.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(issued, name)
    allowed = keys_dir / role.folder
    allowed.mkdir(exist_ok=True)
    shutil.copy(public, allowed / f"{name}.key")
    print(f"{role.value} key pair: {secret}  (copy it to the host that runs as {name!r})")
    print(f"allowed as a {role.value}: {allowed / (name + '.key')}")


def remove(keys_dir: Path, name: str) -> None:
    removed = [path for role in Role if (path := keys_dir / role.folder / f"{name}.key").exists()]
    if not removed:
        raise SystemExit(f"no allowed key named {name!r} in {keys_dir}")
    for path in removed:
        path.unlink()
        print(f"removed {path}")


def list_keys(keys_dir: Path) -> None:
    for role in Role:
        for path in sorted((keys_dir / role.folder).glob("*.key")):
            print(f"{role.value:7} {path.stem}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m broker.keys", description="CURVE keys for the tokenbus bus")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the key folder (default: ./keys)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="make the broker's key pair")
    make = commands.add_parser("new", help="make a key pair for a worker or client host and allow it")
    make.add_argument("name")
    make.add_argument("--role", type=Role, choices=list(Role), required=True)
    revoke = commands.add_parser("remove", help="stop allowing a key")
    revoke.add_argument("name")
    commands.add_parser("list", help="list the allowed keys")
    args = parser.parse_args(argv)
    if args.command == "init":
        init(args.dir)
    elif args.command == "new":
        new(args.dir, args.name, args.role)
    elif args.command == "remove":
        remove(args.dir, args.name)
    else:
        list_keys(args.dir)


if __name__ == "__main__":
    main(sys.argv[1:])
