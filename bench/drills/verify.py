"""After the drill: every job's results read back through the API and every object in the bucket
counted, each PNG downloaded and decoded, each manifest checked against the images it lists."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.drills.load import BUCKET, KEYS, Job
from service.dev.stack import LocalStack

RESULTS_PAGE = 7  # results per GET: several pages for most jobs


def s3_client(stack: LocalStack):
    """A plain S3 client on the stack's SeaweedFS: the verifier reads the bucket on its own, not
    through the service's ObjectStore."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.s3.endpoint,
        aws_access_key_id=stack.s3.access_key,
        aws_secret_access_key=stack.s3.secret_key,
        region_name="us-east-1",
    )


def bucket_objects(stack: LocalStack) -> dict[str, set[str]]:
    """Every object in the bucket, by job id (the second part of jobs/{id}/{index:05d}.png)."""
    client = s3_client(stack)
    out: dict[str, set[str]] = defaultdict(set)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            parts = o["Key"].split("/")
            out[parts[1] if len(parts) == 3 and parts[0] == "jobs" else "<other>"].add(o["Key"])
    return out


def job_results(client: httpx.Client, job_id: str) -> tuple[str, list[int]]:
    """The job's status and the indices its view lists, read in pages of RESULTS_PAGE
    (results_offset / results_next_offset)."""
    indices: list[int] = []
    params = {"results_limit": RESULTS_PAGE}
    while True:
        r = client.get(f"/v1/jobs/{job_id}", params=params)
        if r.status_code != 200:
            return f"GET {r.status_code}", indices
        view = r.json()
        indices += [x["index"] for x in view["results"]]
        if view.get("results_next_offset") is None or len(indices) > view["progress"]["images_total"]:
            return view["status"], indices
        params["results_offset"] = view["results_next_offset"]


def png_ok(data: bytes, size: int) -> bool:
    try:
        from PIL import Image
    except ImportError:  # no Pillow: the signature and the IHDR's width and height
        return data[:8] == b"\x89PNG\r\n\x1a\n" and data[16:24] == size.to_bytes(4, "big") * 2
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.size == (size, size)
    except Exception:
        return False


def verify(stack: LocalStack, jobs: list[Job], created_elsewhere: set[str]) -> dict:
    from service.storage import image_key, manifest_key

    objects = bucket_objects(stack)
    accepted = [j for j in jobs if j.id]
    clients = {
        k: httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {v}"}) for k, v in KEYS.items()
    }
    with ThreadPoolExecutor(8) as pool:
        views = list(pool.map(lambda j: job_results(clients[j.key], j.id), accepted))
        size = clients["A"].get("/v1/models").json()["models"][0]["image_size"]
    for c in clients.values():
        c.close()
    out = Counter(manifests_missing=0, manifests_wrong=0)
    problems = []
    present = []
    manifests = []  # (job id, key, images) of succeeded jobs' manifest.json
    for job, (status, indices) in zip(accepted, views, strict=True):
        n = job.body["num_images"]
        expected = {image_key(job.id, i) for i in range(n)}
        found = objects.pop(job.id, set())
        if manifest_key(job.id) in found:  # a succeeded job's; checked against its images below
            found.discard(manifest_key(job.id))
            manifests.append((job.id, manifest_key(job.id), n))
        elif status == "succeeded":
            out["manifests_missing"] += 1
            problems.append(f"{job.phase} {job.id}: succeeded without a manifest")
        out["succeeded"] += status == "succeeded"
        out["lost"] += status == "GET 404"
        out["failed"] += status in ("failed", "canceled")
        out["unfinished"] += status in ("queued", "running")
        out["images_expected"] += n
        out["images_present"] += len(expected & found)
        out["images_missing"] += len(expected - found)
        out["objects_extra"] += len(found - expected)
        out["results_duplicated"] += len(indices) - len(set(indices))
        out["results_wrong"] += len(set(range(n)) ^ set(indices)) if status == "succeeded" else 0
        if status != "succeeded" or expected != found or sorted(indices) != list(range(n)):
            problems.append(f"{job.phase} {job.id}: {status}, {len(found)}/{n} objects, results {sorted(indices)}")
        present += sorted(expected & found)
    store = s3_client(stack)

    def check(key: str) -> tuple[bool, tuple[str, int]]:
        data = store.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return png_ok(data, size), (hashlib.sha256(data).hexdigest(), len(data))

    with ThreadPoolExecutor(8) as pool:
        checked = dict(zip(present, pool.map(check, present), strict=True))
        listed = list(
            pool.map(lambda m: json.loads(store.get_object(Bucket=BUCKET, Key=m[1])["Body"].read()), manifests)
        )
    decoded = [ok for ok, _ in checked.values()]
    out["pngs_decoded"] = sum(decoded)
    out["pngs_bad"] = len(decoded) - sum(decoded)
    out["manifests"] = len(manifests)
    for (job_id, _, n), manifest in zip(manifests, listed, strict=True):
        entries = {e["key"]: (e["sha256"], e["size"]) for e in manifest["images"]}
        wrong = [k for k, v in entries.items() if checked.get(k, (None, None))[1] != v]
        if manifest["job_id"] != job_id or len(entries) != n or wrong:
            out["manifests_wrong"] += 1
            problems.append(f"job {job_id}: its manifest does not match its images")
    strays = {k: len(v) for k, v in objects.items() if k not in created_elsewhere}
    return {
        "jobs": len(jobs),
        "accepted": len(accepted),
        "not_accepted": [f"{j.phase}: {j.note}" for j in jobs if not j.id],
        **out,
        "objects_of_unknown_jobs": sum(strays.values()),
        "problems": problems[:50],
    }
