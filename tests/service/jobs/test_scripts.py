"""Lua scripts with named KEYS and ARGV (service.jobs.scripts): a call names every key and
argument, and the Lua reads them by name."""

from __future__ import annotations

import pytest

from service.jobs.scripts import Script

ECHO = Script(
    "return {job, events, #index, index[1] or '', now, #rest, rest[1] or ''}",
    keys=["job", "events", "*index"],
    args=["now", "*rest"],
)


def test_a_call_is_laid_out_in_the_declared_order_whatever_the_keyword_order():
    keys, args = ECHO.split({"rest": [1, 2], "now": 9, "index": ["a", "b"], "events": "e", "job": "j"})
    assert keys == ["j", "e", "a", "b"]
    assert args == [9, 1, 2]


def test_a_call_missing_a_name_or_passing_an_undeclared_one_is_refused():
    with pytest.raises(ValueError, match="missing events"):
        ECHO.split({"job": "j", "index": [], "now": 1, "rest": []})
    with pytest.raises(ValueError, match="undeclared job_id"):
        ECHO.split({"job": "j", "events": "e", "index": [], "now": 1, "rest": [], "job_id": "x"})
    with pytest.raises(ValueError, match="missing now; undeclared when"):
        ECHO.split({"job": "j", "events": "e", "index": [], "when": 1, "rest": []})


def test_a_list_goes_only_where_the_script_takes_one():
    with pytest.raises(ValueError, match="'index' takes a list"):
        ECHO.split({"job": "j", "events": "e", "index": "a", "now": 1, "rest": []})
    with pytest.raises(ValueError, match="'job' takes one value"):
        ECHO.split({"job": ["j"], "events": "e", "index": [], "now": 1, "rest": []})


@pytest.mark.parametrize(
    "keys, args, problem",
    [
        (["*index", "job"], [], "only the last"),
        (["job"], ["job"], "must differ"),
        (["job"], ["*job"], "must differ"),
        (["KEYS"], [], "cannot name"),
        (["job"], ["client"], "cannot name"),
        (["job-id"], [], "cannot name"),
        (["end"], [], "cannot name"),
    ],
)
def test_a_script_with_ambiguous_names_is_refused(keys, args, problem):
    with pytest.raises(ValueError, match=problem):
        Script("return 0", keys=keys, args=args)


def test_the_lua_reads_each_value_by_its_name(store, run):
    echo = ECHO.register(store.r)
    reply = run(echo(job="j", events="e", index=["i1", "i2", "i3"], now="7", rest=["r1", "r2"]))
    assert reply == ["j", "e", 3, "i1", "7", 2, "r1"]
    assert run(echo(job="j", events="e", index=[], now="7", rest=[])) == ["j", "e", 0, "", "7", 0, ""]


def test_a_refused_call_sends_nothing(store, run):
    marker = Script("redis.call('SET', key, 'written') return 1", keys=["key"]).register(store.r)
    with pytest.raises(ValueError):
        marker(key="undiffuse:test:marker", extra=1)
    assert run(store.r.get("undiffuse:test:marker")) is None
    assert run(marker(key="undiffuse:test:marker")) == 1
    assert run(store.r.get("undiffuse:test:marker")) == "written"
