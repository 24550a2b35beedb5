"""The real Dockerfile, built and run: its CPU variant built with podman (the base from
debootstrap, no registry: deploy/podman_image.py), started as its own non-root user against a
local Redis-compatible server and SeaweedFS, its HEALTHCHECK and /readyz waited for, one job run
through the API and its PNGs downloaded through the presigned URLs; and what KubeRay's probes need.

The module takes about 7 minutes on 2 cores with nothing cached (CI's fresh machine), 2-3 with
the base and layers cached (docs/deploy.md); the base and the layers stay in podman's store, the
torch index in /var/tmp/undiffuse-ci. Skipped where podman is missing: dev.py installs it as root
(as in CI).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from deploy import podman_image as pi

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1500),  # an uncached build on 2 busy cores, then the container
    pytest.mark.skipif(not pi.available(), reason=pi.SKIP_REASON),
]


@pytest.fixture(scope="module")
def image():
    times = pi.build(pi.IMAGE, log=lambda line: print(line, flush=True))
    print(f"built {pi.IMAGE}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return pi.inspect_image(pi.IMAGE)


@pytest.fixture(scope="module")
def service(image):
    """The container, up: HEALTHCHECK healthy and /readyz 200 (how long each took is printed: -s)."""
    with pi.serve(pi.IMAGE, f"undiffuse-ci-{os.getpid()}") as running:
        try:
            pi.wait("the HEALTHCHECK", running.healthy, 300)
            healthy = time.monotonic() - running.started
            pi.wait("/readyz", lambda: pi.status(running.api_url + "/readyz") == 200, 300)
            ready = time.monotonic() - running.started
        except TimeoutError as e:
            pytest.fail(f"{e}; the container's log ends:\n{running.logs()[-4000:]}")
        print(
            f"HEALTHCHECK healthy {healthy:.0f} s after `podman run`, /readyz 200 after {ready:.0f} s",
            flush=True,
        )
        yield running


def test_image_runs_as_a_non_root_user(image, service):
    assert image["Config"]["User"] == "10001"
    assert service.exec("id", "-u").stdout.strip() == "10001"
    assert service.exec("stat", "-c", "%u", "/proc/1").stdout.strip() == "10001"  # the service's process


def test_healthcheck_is_kept_and_becomes_healthy(image, service):
    check = image["Healthcheck"]["Test"]  # kept: built with --format docker (OCI images drop it)
    assert check == ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/healthz"]
    state = json.loads(pi.podman("inspect", service.name).stdout)[0]["State"]
    assert state["Health"]["Status"] == "healthy", state["Health"]


def test_a_job_runs_and_its_pngs_download(service):
    view, took, pngs = pi.run_job(service)
    assert view["status"] == "succeeded", f"{view}\n{service.logs()[-4000:]}"
    assert len(pngs) == pi.JOB["num_images"]
    for key, png in pngs:
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), key
        assert pi.png_info(png) == "PNG 28x28 L", key
    print(f"job {view['id']}: succeeded in {took:.1f} s, PNG sizes {[len(p) for _, p in pngs]}")


def test_kuberay_probes_find_wget_and_pass_on_a_ray_head(image, service):
    for tool in ("wget", "bash", "grep"):  # KubeRay's exec probes: bash -c "wget ... | grep success"
        assert service.exec("sh", "-c", f"command -v {tool}").returncode == 0, f"no {tool} in the image"
    took = pi.kuberay_head_probe(pi.IMAGE, f"undiffuse-ci-probe-{os.getpid()}")
    print(f"KubeRay's head probe passed {took:.0f} s after `ray start --head`")


def test_nothing_of_the_build_machine_or_the_tests_is_left_in_the_image(image):
    leftovers = [
        "/etc/pip.conf", "/etc/xdg/pip", "/root/.config", "/root/ca.crt", "/etc/ssl/certs/host-ca.crt",
        "/mnt/torch", "/src", "/app/tests", "/opt/venv/lib/python3.11/site-packages/tests",
    ]  # fmt: skip
    script = "for p in " + " ".join(leftovers) + '; do [ -e "$p" ] && echo "$p"; done; true'
    found = pi.podman("run", "--rm", "--network", "none", pi.IMAGE, "sh", "-c", script).stdout.split()
    assert found == [], f"left in the image: {found}"
    history = pi.podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", pi.IMAGE).stdout
    for secret in ("ca.crt", "pip.conf", "file:///mnt/", "/var/tmp/undiffuse-ci"):
        assert secret not in history, f"{secret!r} in the image's history"


def test_the_base_and_torch_stay_cached_for_the_next_run(image):
    assert pi.image_exists(pi.BASE_IMAGE)
    assert list((pi.CACHE / "torch-index" / "torch").glob("torch-*+cpu-cp311-*.whl"))
