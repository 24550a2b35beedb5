"""The `--api-key` values of `python -m service.dev.local` (service.dev.local.owner_keys). No servers."""

from __future__ import annotations

import pytest

from service.api_keys import OWNER
from service.dev import local


def test_without_keys_one_random_key_of_owner_local():
    for values in (None, []):
        [(owner, key)] = local.owner_keys(values)
        assert owner == "local"
        assert key.startswith("ud_") and len(key) > 24
    assert local.owner_keys(None) != local.owner_keys(None)  # new each start


def test_plain_keys_get_distinct_owners_by_position():
    assert local.owner_keys(["k1", "k2", "k3"]) == [("local", "k1"), ("local-2", "k2"), ("local-3", "k3")]
    assert all(OWNER.fullmatch(owner) for owner, _ in local.owner_keys(["k1", "k2"]))


def test_owner_equals_key_names_the_owner():
    assert local.owner_keys(["alice=K1", "bob=K2", "K3"]) == [("alice", "K1"), ("bob", "K2"), ("local-3", "K3")]


def test_only_the_first_equals_sign_separates_the_owner():
    assert local.owner_keys(["team.a=dGVzdA=="]) == [("team.a", "dGVzdA==")]


@pytest.mark.parametrize(
    "values, fragment",
    [
        (["alice=secret-1", "bob=secret-1"], "--api-key 2 repeats the key of --api-key 1"),
        (["secret-1", "x=y", "secret-1"], "--api-key 3 repeats the key of --api-key 1"),
        (["alice=secret-1", "alice=secret-2"], "--api-key 2 repeats owner 'alice' of --api-key 1"),
        (["secret-1", "local=secret-2"], "--api-key 2 repeats owner 'local' of --api-key 1"),
        (["bad owner=secret-1"], "--api-key 1: the owner before '=' must match"),
        (["ok=x", "=secret-1"], "--api-key 2: the owner before '=' must match"),
        (["-alice=secret-1"], "--api-key 1: the owner before '=' must match"),
        (["alice="], "--api-key 1: the key is empty"),
        ([""], "--api-key 1: the key is empty"),
        (["alice=sec ret"], "--api-key 1: the key is empty or contains whitespace"),
    ],
)
def test_malformed_or_repeated_keys_are_refused_in_one_line_without_echoing_a_key(values, fragment):
    with pytest.raises(ValueError) as info:
        local.owner_keys(values)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and "secret" not in message


def test_main_turns_a_refusal_into_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        local.main(["--api-key", "alice=secret-1", "--api-key", "alice=secret-2"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("--api-key 2 repeats owner 'alice' of --api-key 1")
