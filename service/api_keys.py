"""API keys: how they are written in configuration and who they belong to.

`UNDIFFUSE_API_KEYS` is a comma-separated list of entries `[owner=]sha256:<hex>` or `<plain key>`:

    alice=sha256:9f86d08…,alice=sha256:60303ae…,bob=sha256:fd61a03…

The credential is the SHA-256 of the key (`sha256:<64 hex>`), so configuration never holds a
usable key; a plain key is accepted in development only. The owner id names whose jobs a key
sees: two entries of one owner are two keys to the same jobs, so a key is rotated by adding the
new one, moving clients over, and removing the old one. An entry without an owner gets an id
derived from its hash (the first 24 hex digits), which a rotation changes.

    python -m service.api_keys new alice     # prints a new key and its configuration entry

Keys added and revoked while the service runs, configured ones included, are kept in Redis by
service.keyring (`python -m service.keyring add | list | revoke`).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys

OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# an owner only before a hash: a plain key may itself contain "=" (base64 padding)
ENTRY = re.compile(rf"(?:(?P<owner>{OWNER.pattern})=(?=sha256:))?(?P<credential>\S+)")
HASHED = re.compile(r"sha256:(?P<digest>[0-9a-f]{64})")


def digest(key: str) -> str:
    """The hex SHA-256 of a presented key, as entries store it."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_hashed(entry: str) -> bool:
    match = ENTRY.fullmatch(entry.strip())
    return bool(match and HASHED.fullmatch(match["credential"]))


def parse(entries: list[str]) -> dict[str, str]:
    """{key digest: owner id} of configured entries; ValueError names a malformed entry without
    echoing it (it may be a secret)."""
    owners: dict[str, str] = {}
    for position, entry in enumerate(entries, 1):
        match = ENTRY.fullmatch(entry.strip())
        if match is None:
            raise ValueError(f"API key entry {position} is not [owner=]sha256:<64 hex> or [owner=]<key>")
        credential = match["credential"]
        hashed = HASHED.fullmatch(credential)
        if credential.startswith("sha256:") and not hashed:
            raise ValueError(f"API key entry {position}: sha256: must be followed by 64 lower-case hex digits")
        key_digest = hashed["digest"] if hashed else digest(credential)
        owner = match["owner"] or key_digest[:24]
        if owners.setdefault(key_digest, owner) != owner:
            raise ValueError(f"API key entry {position} gives a key to a second owner")
    return owners


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.api_keys",
        description="Make an API key for configuration (UNDIFFUSE_API_KEYS). To add or revoke keys while the "
        "service runs: python -m service.keyring.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="print a new key and its UNDIFFUSE_API_KEYS entry")
    new.add_argument("owner", help="owner id: letters, digits, _ . - (a key rotation keeps it)")
    args = p.parse_args(argv)
    if not OWNER.fullmatch(args.owner):
        p.error(f"owner must match {OWNER.pattern}")
    key = "ud_" + secrets.token_urlsafe(32)
    print(f"key:   {key}\nentry: {args.owner}=sha256:{digest(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
