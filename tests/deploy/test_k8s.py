"""k8s/: kustomize renders both overlays; core objects validate against the Kubernetes schemas,
custom resources against their CRDs; the serveConfigV2 application imports and builds. Beyond
validity, what a real cluster needs (issue 10): the KubeRay operator reaches the head's
dashboard and the Ray pods reach each other, GPU pods land on GPU nodes from zero and refuse to
run on a CPU, no PodDisruptionBudget blocks a drain, the pods read the Secret the docs create,
and nothing applied needs CRDs a cluster may lack."""

import json
import os
import re
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
DOCS = (ROOT / "docs" / "deploy.md").read_text()
CPU_IMAGE, GPU_IMAGE = "ghcr.io/undiffuse/undiffuse-cpu", "ghcr.io/undiffuse/undiffuse-gpu"


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(overlay: str) -> list[dict]:
    return _kustomize(ROOT / "k8s" / "overlays" / overlay)


def render_own_overlay(tmp_path: Path, overlay: str, **kustomization) -> list[dict]:
    """An overlay of the user's own on top of ours, as docs/deploy.md suggests."""
    rel = lambda p: os.path.relpath(ROOT / "k8s" / p, tmp_path)  # noqa: E731
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel(f"overlays/{overlay}")],
        **{k: [rel(c) for c in v] if k == "components" else v for k, v in kustomization.items()},
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return _kustomize(tmp_path)


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def overlay(request):
    return request.param, render(request.param)


def _crd(path: str) -> dict:
    full = CRDS / path
    if not full.is_file():
        pytest.skip("shared/schemas is not beside this checkout")
    return yaml.safe_load(full.read_text())


def _crd_schema(api_version: str, kind: str) -> dict:
    crd = _crd(CRD_FILES[(api_version, kind)])
    version = api_version.split("/")[1]
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def _validate(docs: list[dict]) -> set[str]:
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES:
            jsonschema.validate(doc, _crd_schema(*key))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return kinds


def test_every_object_validates(overlay):
    _, docs = overlay
    kinds = _validate(docs)
    assert {"RayService", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "Namespace"} <= kinds
    assert all(d["metadata"].get("namespace") == "undiffuse" for d in docs if d["kind"] != "Namespace")


def test_the_podmonitor_is_an_optional_component(overlay, tmp_path):
    """`apply -k` of an overlay needs no CRD beyond KubeRay's; the PodMonitor comes with the
    monitoring component, for clusters with prometheus-operator."""
    name, docs = overlay
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    with_monitoring = render_own_overlay(tmp_path, name, components=["components/monitoring"])
    monitors = [d for d in with_monitoring if d["kind"] == "PodMonitor"]
    assert len(monitors) == 1 and monitors[0]["metadata"]["namespace"] == "undiffuse"
    _validate(monitors)
    head_labels = _rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert _selects(monitors[0]["spec"]["selector"], head_labels)
    assert monitors[0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


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


def _ray_pods(docs) -> dict[str, dict]:
    """Template of each Ray pod kind: 'head' and every worker group."""
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    return {"head": rc["headGroupSpec"], **{g["groupName"]: g for g in rc["workerGroupSpecs"]}}


# --- Secrets ---------------------------------------------------------------------------------------
def test_no_secret_and_no_placeholder_is_applied(overlay):
    """`kubectl apply -k` after creating the Secret as the docs say must not overwrite it."""
    _, docs = overlay
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == []
    assert "REPLACE_ME" not in yaml.safe_dump_all(docs)


def test_the_secret_the_docs_create_is_the_one_the_pods_read(overlay):
    from service.settings import Settings

    _, docs = overlay
    created = re.findall(r"kubectl -n (\S+) create secret generic (\S+)((?: \\\n? *--from-literal=\S+)+)", DOCS)
    assert len(created) == 1, "docs/deploy.md creates the Secret exactly once"
    namespace, name, literals = created[0]
    assert namespace == "undiffuse"
    for pod in _ray_pods(docs).values():
        refs = [e["secretRef"] for c in pod["template"]["spec"]["containers"] for e in c["envFrom"] if "secretRef" in e]
        assert refs == [{"name": name}], "the pods read the Secret the docs create (and need it: not optional)"
    keys = re.findall(r"--from-literal=(UNDIFFUSE_[A-Z0-9_]+)=", literals)
    assert "UNDIFFUSE_API_KEYS" in keys
    for key in keys:  # every key the docs put in it is a setting the service reads
        assert key.removeprefix("UNDIFFUSE_").lower() in Settings.model_fields, key


# --- NetworkPolicies -------------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "this check reads matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admitted(docs, dst: dict, src_ns: str, src: dict, port: int) -> bool:
    """Does some NetworkPolicy of the namespace admit TCP to `port` of a pod labelled `dst`, from
    a pod labelled `src` in namespace `src_ns`? (No policy selecting the pod: all is admitted.)"""
    ns_labels = {"kubernetes.io/metadata.name": src_ns}
    policies = [
        p
        for p in docs
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], dst)
    ]
    if not policies:
        return True

    def peer_ok(peer) -> bool:
        if "ipBlock" in peer:
            return False
        ns_ok = _selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else src_ns == "undiffuse"
        return ns_ok and _selects(peer.get("podSelector", {}), src)

    def port_ok(p) -> bool:
        return p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])

    return any(
        (not rule.get("from") or any(peer_ok(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_ok(p) for p in rule["ports"]))
        for p in policies
        for rule in p["spec"].get("ingress", [])
    )


# Ray between its pods: GCS, dashboard, Ray client, object and node managers (ports Ray picks,
# sampled), dashboard agent HTTP and gRPC, the worker port range's ends, Serve, metrics
RAY_PORTS = (6379, 8265, 10001, 8076, 8077, 40123, 52365, 52366, 10002, 19999, 8000, 8080)
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component": "kuberay-operator"}


def test_the_operator_reaches_the_dashboard_and_ray_pods_reach_each_other(overlay):
    _, docs = overlay
    pods = {name: spec["template"]["metadata"]["labels"] for name, spec in _ray_pods(docs).items()}
    head, workers = pods.pop("head"), list(pods.values())
    operator_ns = re.search(r"helm install kuberay-operator kuberay/kuberay-operator .*-n (\S+)", DOCS).group(1)
    # the RayService controller submits serveConfigV2 to, and reads the status from, the dashboard;
    # it checks the head's Serve proxy on 8000
    assert _admitted(docs, head, operator_ns, OPERATOR, 8265)
    assert _admitted(docs, head, operator_ns, OPERATOR, 8000)
    assert not _admitted(docs, head, "default", OPERATOR, 8265), "the operator's namespace, not its labels alone"
    for worker in workers:
        for port in RAY_PORTS:
            assert _admitted(docs, head, "undiffuse", worker, port), ("worker -> head", port)
            assert _admitted(docs, worker, "undiffuse", head, port), ("head -> worker", port)
            assert _admitted(docs, worker, "undiffuse", worker, port), ("worker -> worker", port)
    for pod in (head, *workers):
        assert _admitted(docs, pod, "monitoring", {"app.kubernetes.io/name": "prometheus"}, 8080)
        assert _admitted(docs, pod, "ingress-nginx", {}, 8000)
        for port in (6379, 8265, 10001, 52365):
            assert not _admitted(docs, pod, "default", {"app": "anything"}, port), port
    redis = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _admitted(docs, redis, "undiffuse", head, 6379)
    assert not _admitted(docs, redis, "undiffuse", {"app": "anything"}, 6379)


# --- disruptions -----------------------------------------------------------------------------------
def test_no_pod_disruption_budget_blocks_a_drain(overlay):
    """A PDB over pods whose controller has no scale subresource (RayCluster) cannot count them,
    and blocks their evictions; a budget over a single replica (Redis) blocks every drain."""
    _, docs = overlay
    raycluster = _crd("kuberay/ray.io_rayclusters.yaml")
    assert all("scale" not in v.get("subresources", {}) for v in raycluster["spec"]["versions"])
    ray_pods = [spec["template"]["metadata"]["labels"] for spec in _ray_pods(docs).values()]
    workloads = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"].get("replicas", 1))
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
    ]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]
        assert not any(_selects(selector, labels) for labels in ray_pods), pdb["metadata"]["name"]
        for labels, replicas in workloads:
            if _selects(selector, labels):
                spec = pdb["spec"]
                allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
                assert allowed >= 1, pdb["metadata"]["name"]
    head = _ray_pods(docs)["head"]["template"]["metadata"]
    assert head["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


# --- the RayService --------------------------------------------------------------------------------
# fields KubeRay no longer reads (rayservice_types.go: "Deprecated: This field is not used anymore",
# ray-project/kuberay#1685)
DEPRECATED_RAYSERVICE_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}


def test_no_deprecated_rayservice_fields(overlay):
    _, docs = overlay
    assert not DEPRECATED_RAYSERVICE_FIELDS & set(_rayservice(docs)["spec"])


def _serve_app(docs) -> dict:
    (app,) = yaml.safe_load(_rayservice(docs)["spec"]["serveConfigV2"])["applications"]
    return app


def test_worker_and_ingress_replicas_stay_on_the_head(overlay):
    """GPU pods advertise CPUs too: Worker and Ingress replicas there would keep GPU nodes from
    scaling down. They need a custom resource that only the head advertises."""
    from service.ingress import Ingress
    from worker.deployment import Worker

    _, docs = overlay
    pods = _ray_pods(docs)
    advertised = {
        name: json.loads(json.loads(spec["rayStartParams"]["resources"]))
        if "resources" in spec["rayStartParams"]
        else {}
        for name, spec in pods.items()
    }
    overrides = {d["name"]: d["ray_actor_options"] for d in _serve_app(docs)["deployments"]}
    assert set(overrides) == {"Worker", "Ingress"}
    for deployment in (Worker, Ingress):
        options = overrides[deployment.name]
        # a config's ray_actor_options replace the code's: nothing but the resource may change
        assert {k: v for k, v in options.items() if k != "resources"} == deployment.ray_actor_options
        for resource, amount in options["resources"].items():
            assert advertised["head"].get(resource, 0) >= 100 * amount, (deployment.name, resource)
            assert all(resource not in adv for name, adv in advertised.items() if name != "head")


def test_gpu_overlay_puts_denoisers_on_gpu_nodes_and_they_refuse_to_run_without_one(tmp_path):
    docs = render("gpu")
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    (group,) = rc["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 8)
    spec = group["template"]["spec"]
    container = spec["containers"][0]
    assert (
        container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 1
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # the GPU request places the pod; a label only GPU feature discovery sets on a running node
    # would keep the autoscaler from scaling the pool up from zero
    assert "nodeSelector" not in spec and "affinity" not in spec
    assert container["image"].startswith(GPU_IMAGE + ":")
    assert rc["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].startswith(CPU_IMAGE + ":")
    app = _serve_app(docs)
    assert app["args"]["denoiser_num_gpus"] == 1 and app["args"]["settings"]["device"] == "cuda"
    cpu_group = _rayservice(render("cpu"))["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cpu_group["template"]["spec"]["containers"][0]["image"].startswith(CPU_IMAGE + ":")

    # `kustomize edit set image` for the CPU image (docs/deploy.md) leaves the GPU pods' image alone
    images = [
        {"name": CPU_IMAGE, "newName": "registry.example.com/undiffuse-cpu", "newTag": "1.2"},
        {"name": GPU_IMAGE, "newName": "registry.example.com/undiffuse-gpu", "newTag": "1.2"},
    ]
    rc = _rayservice(render_own_overlay(tmp_path, "gpu", images=images[:1]))["spec"]["rayClusterConfig"]
    assert rc["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/undiffuse-cpu:1.2"
    assert rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"].startswith(GPU_IMAGE + ":")
    rc = _rayservice(render_own_overlay(tmp_path, "gpu", images=images))["spec"]["rayClusterConfig"]
    assert (
        rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
        == "registry.example.com/undiffuse-gpu:1.2"
    )


def test_serve_config_imports_and_builds_the_application(overlay):
    from ray.serve import Application

    from service.app import AppArgs, build_app

    name, docs = overlay
    app = _serve_app(docs)
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is build_app
    built = builder(AppArgs.model_validate(app["args"]))
    assert isinstance(built, Application)
    ingress = built._bound_deployment
    denoiser = ingress.init_args[1]._bound_deployment
    assert denoiser.name == "Denoiser" and ingress.name == "Ingress"
    # what each Denoiser replica is handed: on the gpu overlay, a GPU and device=cuda
    assert denoiser.ray_actor_options["num_gpus"] == (1 if name == "gpu" else 0)
    assert denoiser.init_args[0].device == ("cuda" if name == "gpu" else "auto")
    policy = app["args"]["denoiser_autoscaling"]
    serve_autoscaling = AppArgs.model_validate(app["args"]).denoiser_autoscaling.to_serve()
    module, _, cls = serve_autoscaling["policy"]["policy_function"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[cls]), cls))
    assert serve_autoscaling["max_replicas"] == policy["max_replicas"]
