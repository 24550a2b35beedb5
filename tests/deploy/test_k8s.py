"""k8s/: kustomize renders both overlays; core objects validate against the Kubernetes schemas,
custom resources against their CRDs; the serveConfigV2 application imports and builds."""

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "schemas"
K8S_VERSION = "1.33.0"
CRD_FILES = {
    ("ray.io/v1", "RayService"): "kuberay/ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", f"k8s/overlays/{overlay}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def overlay(request):
    return request.param, render(request.param)


def _crd_schema(api_version: str, kind: str) -> dict:
    path = CRDS / CRD_FILES[(api_version, kind)]
    if not path.is_file():
        pytest.skip("shared/schemas is not beside this checkout")
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def test_every_object_validates(overlay):
    _, docs = overlay
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            jsonschema.validate(doc, _crd_schema(*key))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {
        "RayService",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "PodMonitor",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds


def _pod_specs(docs):
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            yield doc["spec"]["template"]["spec"]
        if doc["kind"] == "RayService":
            rc = doc["spec"]["rayClusterConfig"]
            yield rc["headGroupSpec"]["template"]["spec"]
            for group in rc["workerGroupSpecs"]:
                yield group["template"]["spec"]


def test_every_container_has_limits_and_a_locked_down_security_context(overlay):
    _, docs = overlay
    specs = list(_pod_specs(docs))
    assert len(specs) == 3
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
                c["resources"]["limits"]
            )
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def _rayservice(docs):
    return next(d for d in docs if d["kind"] == "RayService")


def test_gpu_overlay_puts_denoisers_on_gpu_nodes():
    rs = _rayservice(render("gpu"))
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    group = rc["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)
    spec = group["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and spec["nodeSelector"]
    cpu_group = _rayservice(render("cpu"))["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_serve_config_imports_and_builds_the_application(overlay):
    from ray.serve import Application

    from service.app import AppArgs, build_app

    name, docs = overlay
    serve_config = yaml.safe_load(_rayservice(docs)["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is build_app
    built = builder(AppArgs.model_validate(app["args"]))
    assert isinstance(built, Application)
    sampler = app["args"]["denoiser_num_gpus"]
    assert sampler == (1 if name == "gpu" else 0)
    policy = app["args"]["denoiser_autoscaling"]
    serve_autoscaling = AppArgs.model_validate(app["args"]).denoiser_autoscaling.to_serve()
    module, _, cls = serve_autoscaling["policy"]["policy_function"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[cls]), cls))
    assert serve_autoscaling["max_replicas"] == policy["max_replicas"]
