"""API key entries (service.api_keys) and how Settings takes them. No servers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service import api_keys
from service.settings import Settings

HEX = "ab" * 32


def test_entries_map_key_hashes_to_owners():
    owners = api_keys.parse([f"alice=sha256:{HEX}", f"alice=sha256:{'cd' * 32}", "plain-key", f"sha256:{'ef' * 32}"])
    assert owners[HEX] == owners["cd" * 32] == "alice"
    assert owners[api_keys.digest("plain-key")] == api_keys.digest("plain-key")[:24]
    assert owners["ef" * 32] == "ef" * 12


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("alice=sha256:ABC", "64 lower-case hex"),
        (f"alice=sha256:{HEX[:-1]}", "64 lower-case hex"),
        ("bad owner=key", r"not \[owner=\]"),
    ],
)
def test_malformed_entries_are_refused_without_echoing_them(entry, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        api_keys.parse([entry])
    assert "ABC" not in str(info.value) and HEX[:-1] not in str(info.value)


def test_a_plain_key_may_contain_equals_signs():
    """Only a hash carries an owner: base64 padding or a "team=..." key stays a plain key."""
    owners = api_keys.parse(["dGVzdA==", "team-key=abc"])
    assert owners == {
        api_keys.digest("dGVzdA=="): api_keys.digest("dGVzdA==")[:24],
        api_keys.digest("team-key=abc"): api_keys.digest("team-key=abc")[:24],
    }


def test_one_key_cannot_belong_to_two_owners():
    with pytest.raises(ValueError, match="second owner"):
        api_keys.parse([f"alice=sha256:{HEX}", f"bob=sha256:{HEX}"])


def test_production_takes_hashed_keys_only():
    s3 = {"s3_access_key_id": "s3-key", "s3_secret_access_key": "s3-secret-0123456789abcdef"}
    with pytest.raises(ValidationError, match="plain key"):
        Settings(environment="production", api_keys=["a-plain-key"], **s3)
    settings = Settings(environment="production", api_keys=f"alice=sha256:{HEX}", **s3)
    assert settings.key_owners == {HEX: "alice"}


def test_the_new_command_prints_a_key_and_its_entry(capsys):
    assert api_keys.main(["new", "alice"]) == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    key, entry = out["key"].strip(), out["entry"].strip()
    assert api_keys.parse([entry]) == {api_keys.digest(key): "alice"}
