"""The drill's outcomes: HTTP answers sorted by when they came, each target met or missed, and the
Markdown table the drill prints."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict

from bench.drills.load import Call, Recorder


def five_hundreds(rec: Recorder, gap: tuple[float, float]) -> dict:
    """5xx answers outside the Redis gap (any), inside it (anything but 503), and no-answers. A
    request is in the gap if it was answered after the kill and sent before the API was back."""

    def in_gap(c: Call) -> bool:
        return c.answered >= gap[0] and c.sent < gap[1]

    outside = [c for c in rec.calls if c.status is not None and c.status >= 500 and not in_gap(c)]
    inside_bad = [c for c in rec.calls if c.status not in (None, 503) and c.status >= 500 and in_gap(c)]
    no_answer = [c for c in rec.calls if c.status is None]
    missing_retry_after = [c for c in rec.calls if c.status in (429, 503) and not c.retry_after]
    return {
        "requests": len(rec.calls),
        "by_status": dict(Counter(str(c.status) for c in rec.calls)),
        "5xx_outside_redis_gap": len(outside),
        "5xx_outside_redis_gap_by_phase": dict(Counter(c.phase for c in outside)),
        "5xx_other_than_503_in_gap": len(inside_bad),
        "no_answer": len(no_answer),
        "no_answer_by_phase": dict(Counter(c.phase for c in no_answer)),
        "429_or_503_without_retry_after": len(missing_retry_after),
        "examples": [asdict(c) for c in (outside + inside_bad + no_answer)[:10]],
    }


def targets(result: dict) -> list[tuple[str, object, str, bool]]:
    v, h, calls = result["verification"], result["hostile"], result["http"]
    kills = result["load_with_kills"]["kills"]
    recovered = [k["recovery_s"] for k in kills if k.get("recovery_s") is not None]
    orphaned = [k for k in kills if k.get("orphaned_shards")]
    stranded = [k for k in orphaned if k.get("orphans_reclaimed_s") is None]
    rows = [
        ("jobs accepted", f"{v['accepted']} / {v['jobs']}", "all", v["accepted"] == v["jobs"]),
        ("jobs succeeded", v["succeeded"], f"{v['accepted']}", v["succeeded"] == v["accepted"]),
        ("jobs failed or canceled", v["failed"], "0", v["failed"] == 0),
        ("jobs lost (404) or unfinished", v["lost"] + v["unfinished"], "0", v["lost"] + v["unfinished"] == 0),
        (
            "images expected / present",
            f"{v['images_expected']} / {v['images_present']}",
            "equal",
            v["images_missing"] == 0,
        ),
        ("images missing", v["images_missing"], "0", v["images_missing"] == 0),
        (
            "manifests missing / not matching the images",
            f"{v.get('manifests_missing', 0)} / {v.get('manifests_wrong', 0)}",
            "0 / 0",
            not v.get("manifests_missing") and not v.get("manifests_wrong"),
        ),  # fmt: skip
        (
            "objects extra / results duplicated",
            f"{v['objects_extra']} / {v['results_duplicated']}",
            "0 / 0",
            v["objects_extra"] == 0 and v["results_duplicated"] == 0 and v["results_wrong"] == 0,
        ),  # fmt: skip
        (
            "PNGs downloaded and decoded",
            f"{v['pngs_decoded']} ok, {v['pngs_bad']} bad",
            "0 bad",
            v["pngs_bad"] == 0 and v["pngs_decoded"] == v["images_present"],
        ),  # fmt: skip
        ("replica kills recovered", f"{len(recovered)} / {len(kills)}", "all", len(recovered) == len(kills)),
        (
            "killed Workers' shards reclaimed",
            f"{len(orphaned) - len(stranded)} / {len(orphaned)} kills",
            "all",
            not stranded,
        ),  # fmt: skip
        ("5xx outside the Redis gap", calls["5xx_outside_redis_gap"], "0", calls["5xx_outside_redis_gap"] == 0),
        (
            "5xx other than 503 in the Redis gap",
            calls["5xx_other_than_503_in_gap"],
            "0",
            calls["5xx_other_than_503_in_gap"] == 0,
        ),  # fmt: skip
        (
            "429/503 without Retry-After",
            calls["429_or_503_without_retry_after"],
            "0",
            calls["429_or_503_without_retry_after"] == 0,
        ),  # fmt: skip
        ("requests without an HTTP answer", calls["no_answer"], "0", calls["no_answer"] == 0),
        ("hostile requests: 5xx", len(h["server_errors"]), "0", not h["server_errors"]),
        ("hostile requests: cross-key reads", len(h["cross_key_reads"]), "0", not h["cross_key_reads"]),
    ]
    return rows


def info_rows(result: dict) -> list[tuple[str, object]]:
    kills = result["load_with_kills"]["kills"]
    rows = [
        (f"{name}: wall time, images, image-steps/s", f"{p['wall_s']} s, {p['images']}, {p['image_steps_per_s']}")
        for name, p in (("load + kills", result["load_with_kills"]), ("Redis", result["redis"]), ("S3", result["s3"]))
    ]
    for kind in ("Worker", "Denoiser"):
        mine = [k for k in kills if k["kind"] == kind]
        for label, name in (("recovery", "recovery_s"), ("replacement running", "replacement_running_s")):
            vals = [k[name] for k in mine if k.get(name) is not None]
            if vals:
                rows.append((f"{kind} kill -9 x{len(mine)}: {label}", _spread(vals)))
        vals = [k["orphans_reclaimed_s"] for k in mine if k.get("orphans_reclaimed_s") is not None]
        if vals:
            held = sum(k.get("orphaned_shards") or 0 for k in mine)
            rows.append((f"{kind} kill -9: its {held} pending shards reclaimed", _spread(vals)))
        vals = [k["in_flight_jobs_done_s"] for k in mine if k.get("in_flight_jobs_done_s") is not None]
        if vals:
            rows.append((f"{kind} kill -9: jobs in flight at the kill all done", _spread(vals)))
    r = result["redis"]
    rows += [
        ("Redis kill -9: API answering 2xx again after", f"{r['api_back_s']} s"),
        ("Redis gap: responses by status", json.dumps(r["gap_responses"])),
        ("S3 outage: POST answers during it", json.dumps(result["s3"]["outage_post_responses"])),
        ("Redis: last job of the phase ended after the restart", f"{r.get('last_job_ended_after_restart_s')} s"),
        (
            "S3 outage: last job of the phase ended after S3 was back",
            f"{result['s3'].get('last_job_ended_after_restart_s')} s",
        ),
        ("hostile requests: answers by status", json.dumps(result["hostile"]["by_status"])),
        ("hostile requests: status other than expected", len(result["hostile"]["unexpected"])),
        ("all client requests by status", json.dumps(result["http"]["by_status"])),
    ]
    return rows


def _spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.1f} s, max {max(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
    )


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\n# fault drills ({cfg['size']}): {platform.node()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, wall {result['wall_s']:.0f} s"
    )
    print("| outcome | value | target | |\n|---|---|---|---|")
    for name, value, target, ok in result["targets"]:
        print(f"| {name} | {value} | {target} | {'✔' if ok else '✘'} |")
    for name, value in result["info"]:
        print(f"| {name} | {value} | — | |")
    notes = ("unexpected", "no_answer", "redirects")
    for section, key in [("hostile", k) for k in notes] + [("verification", "problems")]:
        for line in result[section][key][:20]:
            print(f"  {section} {key}: {line}")
