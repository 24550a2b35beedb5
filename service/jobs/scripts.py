"""Lua scripts with named KEYS and ARGV.

A script declares the names of its keys and arguments; its Lua starts with a `local` binding for
each (`local job = KEYS[1]`), and a call passes each by name:

    _START = Script(LUA, keys=["job", "events", "*index"], args=["now", "job_id"])
    start = _START.register(client)
    await start(job=..., events=..., index=[...], now=..., job_id=...)

So no script body counts positions, and a call that misses a name or passes one the script does
not declare is refused before anything reaches Redis. The last name of `keys` or of `args` may
be starred (`*index`): it takes a list of any length, bound in Lua as a table of the values
that follow the named ones (a script iterating it reads `#index`, never `#KEYS`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Sequence
from typing import Any

import redis.asyncio as aioredis

_NAME = re.compile(r"\*?[a-z_][a-z0-9_]*")
_RESERVED = {  # the keyword a call passes a pipeline with, Lua's own words, and the globals a script uses
    "client",
    *"and break do else elseif end false for function if in local nil not or repeat return then true until while".split(),
    *"redis cjson cmsgpack bit struct string table math os tonumber tostring type unpack next pairs ipairs".split(),
    *"select error pcall assert setmetatable getmetatable rawget rawset _G KEYS ARGV".split(),
}


class Script:
    """One Lua script and the names of its KEYS and ARGV (see the module docstring)."""

    def __init__(self, lua: str, keys: Sequence[str] = (), args: Sequence[str] = ()) -> None:
        self.keys, self.args = tuple(keys), tuple(args)
        names = [name.lstrip("*") for name in (*self.keys, *self.args)]
        for group in (self.keys, self.args):
            for i, name in enumerate(group):
                if not _NAME.fullmatch(name) or name.lstrip("*") in _RESERVED:
                    raise ValueError(f"{name!r} cannot name a script's key or argument")
                if name.startswith("*") and i != len(group) - 1:
                    raise ValueError(f"only the last key or argument may take a list, not {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"a script's key and argument names must differ: {names}")
        self.source = _bindings("KEYS", self.keys) + _bindings("ARGV", self.args) + lua

    def split(self, values: dict[str, Any]) -> tuple[list, list]:
        """(KEYS, ARGV) of a call that gives every declared name its value; ValueError for a
        missing or an undeclared name, or a list that is not a list."""
        declared = {name.lstrip("*") for name in (*self.keys, *self.args)}
        missing, extra = sorted(declared - values.keys()), sorted(values.keys() - declared)
        if missing or extra:
            problems = [
                f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("undeclared", extra)) if names
            ]
            raise ValueError("script call: " + "; ".join(problems))
        return _flatten(self.keys, values), _flatten(self.args, values)

    def register(self, client: aioredis.Redis) -> Registered:
        return Registered(self, client)


class Registered:
    """A script registered on a client; called with its names as keywords (and `client=` a
    pipeline to buffer the call in a transaction)."""

    def __init__(self, script: Script, client: aioredis.Redis) -> None:
        self.script = script
        self._lua = client.register_script(script.source)

    def __call__(self, client: Any = None, **values: Any) -> Awaitable[Any]:
        keys, args = self.script.split(values)
        return self._lua(keys=keys, args=args, client=client)


def _bindings(table: str, names: tuple[str, ...]) -> str:
    lines = []
    for i, name in enumerate(names, start=1):
        if name.startswith("*"):
            rest = name[1:]
            lines.append(f"local {rest} = {{}}\nfor i = {i}, #{table} do {rest}[#{rest} + 1] = {table}[i] end\n")
        else:
            lines.append(f"local {name} = {table}[{i}]\n")
    return "".join(lines)


def _flatten(names: tuple[str, ...], values: dict[str, Any]) -> list:
    out: list = []
    for name in names:
        if name.startswith("*"):
            rest = values[name[1:]]
            if isinstance(rest, (str, bytes)) or not isinstance(rest, Sequence):
                raise ValueError(f"script argument {name[1:]!r} takes a list, got {type(rest).__name__}")
            out.extend(rest)
        elif isinstance(values[name], (list, tuple, set, dict)):
            raise ValueError(f"script argument {name!r} takes one value, got {type(values[name]).__name__}")
        else:
            out.append(values[name])
    return out
