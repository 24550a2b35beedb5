"""k8s/: kustomize renders both overlays; core objects validate against the Kubernetes schemas,
custom resources against their CRDs; the serveConfigV2 application imports and builds. Beyond
validity, what a real cluster needs (issue 10): the KubeRay operator reaches the head's
dashboard and the Ray pods reach each other, GPU pods land on GPU nodes from zero and refuse to
run on a CPU, no PodDisruptionBudget blocks a drain, the pods read the Secret the docs create,
and nothing applied needs CRDs a cluster may lack. Hardened (issue 23): Ray takes only requests
with its token, Redis a password from the Secret and no more memory than it may use, every
container runs on a read-only root filesystem, egress is denied but for what the service calls,
and the optional components put TLS in front of the API and between the pods and Redis."""

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.slow  # seconds per test on 2 cores: not in the fast tier

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
    keys = re.findall(r"--from-literal=([A-Z0-9_]+)=", literals)
    assert {"UNDIFFUSE_API_KEYS", "REDIS_PASSWORD"} <= set(keys)
    for key in keys:  # every UNDIFFUSE_ key the docs put in it is a setting the service reads
        if key.startswith("UNDIFFUSE_"):
            assert key.removeprefix("UNDIFFUSE_").lower() in Settings.model_fields, key
    # every key a pod takes from it by name (a missing one stops the pod) is one the docs create
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for spec in _pod_specs(docs)
        for c in spec["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs, "the Ray pods and Redis take REDIS_PASSWORD from the Secret"
    for ref in refs:
        assert ref["name"] == name and ref["key"] in keys and not ref.get("optional"), ref


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


# --- hardening: Redis -----------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


# the first release of each Redis line with the 2025 Lua fixes (CVE-2025-49844, -46817, -46818,
# -46819: 7.4.6) and the July 2026 ones (CVE-2026-23479, -25243, -23631, and the stream RESTORE
# use-after-free: 7.4.10); a line not listed here has to be added with its first patched release
REDIS_PATCHED = {
    (7, 2): (7, 2, 15),
    (7, 4): (7, 4, 10),
    (8, 2): (8, 2, 8),
    (8, 4): (8, 4, 5),
    (8, 6): (8, 6, 5),
    (8, 8): (8, 8, 1),
}
SAMPLE_PASSWORD = "0123456789abcdef" * 4  # what `openssl rand -hex 32` makes


def _redis(docs) -> dict:
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis"]
    return sts


def _redis_command(container: dict) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(argv, {--option: value}, the configuration read from standard input) of the Redis
    container's `sh -c` script: `exec redis-server OPTIONS - <<EOF ... EOF`."""
    assert container["command"] == ["sh", "-c"] and len(container["args"]) == 1
    line, _, heredoc = container["args"][0].partition("<<EOF\n")
    argv = shlex.split(line.replace("\\\n", " "))
    body, _, rest = heredoc.rpartition("EOF")
    assert rest.strip() == "", "nothing runs after the here-document"
    config = dict(entry.split(maxsplit=1) for entry in body.splitlines() if entry.strip())
    assert argv[:2] == ["exec", "redis-server"] and argv[-1] == "-", "redis-server is PID 1 and reads stdin"
    options = argv[2:-1]
    assert all(o.startswith("--") for o in options[::2]) and len(options) % 2 == 0, options
    return argv, dict(zip(options[::2], options[1::2], strict=True)), config


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity (2Gi) or a Redis size (1536mb: Redis's mb is 1024*1024)."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 2**10}
    return int(number) * units[unit]


def _expand(container: dict, secret: dict[str, str]) -> dict[str, str]:
    """The container's `env` as the kubelet makes it: secretKeyRefs from `secret`, `$(VAR)`
    expanded from what is defined before (an undefined one stays as written)."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
        else:
            out[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    return out


def test_redis_is_a_patched_release():
    docs = render("cpu")
    (container,) = _redis(docs)["spec"]["template"]["spec"]["containers"]
    name, _, tag = container["image"].partition(":")
    assert name == "redis", "the official image"
    version = _version(tag)
    assert len(version) == 3, f"pin a patch release, not {tag!r}"
    line = version[:2]
    assert line in REDIS_PATCHED, f"Redis {line}: add its first release with the 2025 and 2026 CVE fixes"
    assert version >= REDIS_PATCHED[line], container["image"]


def test_redis_requires_a_password_from_the_secret_and_never_evicts(overlay):
    """requirepass from the Secret, never on a command line; maxmemory below the container's
    limit with noeviction: Redis holds the queue and the job records, so when it is full it
    must refuse writes, not drop jobs."""
    _, docs = overlay
    spec = _redis(docs)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    argv, options, config = _redis_command(container)
    assert config == {"requirepass": "$REDIS_PASSWORD"}, "the password comes on standard input"
    assert not any("requirepass" in a or "REDIS_PASSWORD" in a for a in argv), "no password on the command line"
    env = _expand(container, {"REDIS_PASSWORD": SAMPLE_PASSWORD})
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == SAMPLE_PASSWORD  # the probe authenticates
    assert "PONG" in " ".join(container["readinessProbe"]["exec"]["command"]), "NOAUTH is not ready"
    assert options["--maxmemory-policy"] == "noeviction"
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert 0.5 * limit <= _bytes(options["--maxmemory"]) <= 0.8 * limit, "room for an AOF rewrite's fork"
    assert options["--appendonly"] == "yes" and options["--dir"] == "/data"


def test_the_ray_pods_reach_redis_with_its_password(overlay):
    from redis.connection import parse_url

    _, docs = overlay
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert "UNDIFFUSE_REDIS_URL" not in config, "built in one place, from the password"
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "redis"]
    port = service["spec"]["ports"][0]["port"]
    for name, group in _ray_pods(docs).items():
        env = _expand(group["template"]["spec"]["containers"][0], {"REDIS_PASSWORD": SAMPLE_PASSWORD})
        url = parse_url(env["UNDIFFUSE_REDIS_URL"])
        assert (url["host"], url["port"], url["password"]) == ("redis", port, SAMPLE_PASSWORD), name


# --- hardening: the pods --------------------------------------------------------------------------
HOME = re.search(r"--home-dir (\S+)", (ROOT / "Dockerfile").read_text()).group(1)
# where Ray writes: sessions and logs, the rest of /tmp (torch's compile caches, spilled objects),
# and the image user's home (~/.cache, ~/.triton); KubeRay mounts /dev/shm itself
RAY_WRITES = {"/tmp/ray", "/tmp", HOME}


def _containers(docs):
    """(who, container, its pod's spec) for every container of the Ray and Redis pods, with the
    autoscaler KubeRay adds to the head pod as autoscalerOptions describes it."""
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    for name, group in _ray_pods(docs).items():
        for container in group["template"]["spec"]["containers"]:
            yield name, container, group["template"]["spec"]
    if rc.get("enableInTreeAutoscaling"):
        yield "autoscaler", rc["autoscalerOptions"], rc["headGroupSpec"]["template"]["spec"]
    spec = _redis(docs)["spec"]["template"]["spec"]
    for container in spec["containers"]:
        yield "redis", container, spec


def test_every_container_has_a_read_only_root_filesystem(overlay):
    _, docs = overlay
    claims = {t["metadata"]["name"] for t in _redis(docs)["spec"]["volumeClaimTemplates"]}
    seen = set()
    for who, container, spec in _containers(docs):
        seen.add(who)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, who
        volumes = {v["name"] for v in spec.get("volumes", [])} | (claims if who == "redis" else set())
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (who, mount)
    assert {"head", "denoisers", "autoscaler", "redis"} <= seen
    for name, group in _ray_pods(docs).items():
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0]["volumeMounts"]}
        assert RAY_WRITES <= set(mounts), name
        assert all(set(mounts[path]) == {"name", "emptyDir"} for path in RAY_WRITES), name
    # the autoscaler (`ray kuberay-autoscaler`, the head's image): KubeRay mounts /tmp/ray in it
    autoscaler = _rayservice(docs)["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert RAY_WRITES - {"/tmp/ray"} <= {m["mountPath"] for m in autoscaler["volumeMounts"]}


def test_only_the_autoscaler_gets_a_service_account_token(overlay):
    """The in-tree autoscaler, a container of the head pod, scales the Denoiser pods through the
    Kubernetes API; nothing else in these pods talks to it."""
    _, docs = overlay
    assert _redis(docs)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    pods = _ray_pods(docs)
    for name, group in pods.items():
        if name != "head":
            assert group["template"]["spec"]["automountServiceAccountToken"] is False, name
    assert _rayservice(docs)["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert pods["head"]["template"]["spec"].get("automountServiceAccountToken", True) is True


def test_ray_requires_its_token(overlay):
    """Ray token authentication (Ray >= 2.52; KubeRay >= 1.5.1 generates the token and hands it to
    every Ray container and to itself): without the token, the dashboard and job API, GCS and
    the Ray client refuse."""
    _, docs = overlay
    rc = _rayservice(docs)["spec"]["rayClusterConfig"]
    assert rc["authOptions"] == {"mode": "token"}
    locked = re.search(r"^ray==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert rc["rayVersion"] == locked and _version(locked) >= (2, 52, 0)
    helm = re.search(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", DOCS).group(1)
    assert _version(helm) >= (1, 5, 1), "authOptions needs KubeRay 1.5.1"
    # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN; nothing here may override them
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert not {k for k in config if k.startswith("RAY_AUTH")}
    for who, container, _ in _containers(docs):
        assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, who


# --- hardening: egress ----------------------------------------------------------------------------
def _egress_allowed(docs, src: dict, dst: tuple, port: int, protocol: str = "TCP") -> bool:
    """Does some NetworkPolicy let a pod labelled `src` (namespace undiffuse) open `protocol`/`port`
    to `dst`: ("ip", address) outside the cluster, or ("pod", namespace, labels)? ipBlocks are
    taken to match external addresses only (whether they match pod IPs depends on the CNI)."""
    policies = [
        p
        for p in docs
        if p["kind"] == "NetworkPolicy"
        and "Egress" in p["spec"].get("policyTypes", [])
        and _selects(p["spec"]["podSelector"], src)
    ]
    if not policies:
        return True

    def peer_ok(peer) -> bool:
        if "ipBlock" in peer:
            if dst[0] != "ip":
                return False
            address = ipaddress.ip_address(dst[1])

            def inside(cidr: str) -> bool:
                network = ipaddress.ip_network(cidr)
                return address.version == network.version and address in network

            return inside(peer["ipBlock"]["cidr"]) and not any(map(inside, peer["ipBlock"].get("except", [])))
        if dst[0] != "pod":
            return False
        _, ns, labels = dst
        ns_labels = {"kubernetes.io/metadata.name": ns}
        ns_ok = _selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else ns == "undiffuse"
        return ns_ok and _selects(peer.get("podSelector", {}), labels)

    def port_ok(p) -> bool:
        return p.get("protocol", "TCP") == protocol and p["port"] <= port <= p.get("endPort", p["port"])

    return any(
        (not rule.get("to") or any(peer_ok(peer) for peer in rule["to"]))
        and (not rule.get("ports") or any(port_ok(p) for p in rule["ports"]))
        for p in policies
        for rule in p["spec"].get("egress", [])
    )


OUTSIDE = ("ip", "203.0.113.7")  # any address outside the cluster (TEST-NET-3)
PROBED = [(p, "TCP") for p in (22, 53, 80, 443, 3306, 5432, 6379, 6443, 8000, 8080, 8265, 9000, 10001)]
PROBED += [(53, "UDP"), (123, "UDP"), (443, "UDP")]
DNS = {(53, "UDP"), (53, "TCP")}


def test_egress_is_denied_but_for_dns_redis_s3_webhooks_and_ray_itself(overlay):
    _, docs = overlay
    deny = [
        p
        for p in docs
        if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Egress"]
    ]
    assert [p["spec"].get("egress", []) for p in deny].count([]) == 1, "one default deny for every pod"
    pods = {name: g["template"]["metadata"]["labels"] for name, g in _ray_pods(docs).items()}
    head, redis = pods.pop("head"), _redis(docs)["spec"]["template"]["metadata"]["labels"]
    expected_outside = {
        "head": DNS | {(443, "TCP"), (80, "TCP"), (6443, "TCP")},  # S3, webhooks, the Kubernetes API
        **{name: DNS | {(443, "TCP")} for name in pods},  # S3 (a model sync in an init container)
        "redis": DNS,
    }
    for name, labels in [("head", head), *pods.items(), ("redis", redis)]:
        reached = {(port, proto) for port, proto in PROBED if _egress_allowed(docs, labels, OUTSIDE, port, proto)}
        assert reached == expected_outside[name], name
        assert _egress_allowed(docs, labels, ("pod", "kube-system", {"k8s-app": "kube-dns"}), 53, "UDP"), name
        assert not _egress_allowed(docs, labels, ("pod", "default", {"app": "anything"}), 5432), name
    for labels in (head, *pods.values()):
        assert _egress_allowed(docs, labels, ("pod", "undiffuse", redis), 6379)
        assert not _egress_allowed(docs, labels, ("pod", "undiffuse", redis), 6380)
        for other in (head, *pods.values()):
            for port in RAY_PORTS:
                assert _egress_allowed(docs, labels, ("pod", "undiffuse", other), port), port
    assert not _egress_allowed(docs, redis, ("pod", "undiffuse", head), 8000), "Redis calls nobody"
    # every rule to addresses (or anywhere) names its ports: 53, 80, 443 and 6443 only
    for policy in (p for p in docs if p["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            if not rule.get("to") or any("ipBlock" in peer for peer in rule["to"]):
                assert rule.get("ports"), policy["metadata"]["name"]
                assert {(p["port"], p.get("endPort")) for p in rule["ports"]} <= {
                    (53, None),
                    (80, None),
                    (443, None),
                    (6443, None),
                }, policy["metadata"]["name"]


def _docs_block(marker: str) -> dict:
    """The YAML code block of docs/deploy.md that contains `marker`."""
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", DOCS, re.S) if marker in b]
    assert len(blocks) == 1, marker
    return yaml.safe_load(blocks[0])


def test_the_documented_s3_egress_patch_narrows_s3(overlay, tmp_path):
    """docs/deploy.md's overlay for an S3 endpoint at a known address and port (MinIO on 9000
    here): S3 on that address only, and the Denoiser pods reach nothing else outside."""
    name, _ = overlay
    patches = _docs_block("name: ray-egress-s3")["patches"]
    docs = render_own_overlay(tmp_path, name, patches=patches)
    _validate([d for d in docs if d["kind"] == "NetworkPolicy"])
    (policy,) = [d for d in docs if d["metadata"]["name"] == "ray-egress-s3"]
    (rule,) = policy["spec"]["egress"]
    (peer,) = rule["to"]
    (port,) = rule["ports"]
    inside = ("ip", str(next(ipaddress.ip_network(peer["ipBlock"]["cidr"]).hosts())))
    denoisers = _ray_pods(docs)["denoisers"]["template"]["metadata"]["labels"]
    assert _egress_allowed(docs, denoisers, inside, port["port"])
    assert not _egress_allowed(docs, denoisers, OUTSIDE, 443) and not _egress_allowed(docs, denoisers, OUTSIDE, 9000)


# --- optional components: TLS in front of the API, TLS to Redis -----------------------------------
def _nginx_size(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", size).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20}[unit.lower()]


def test_the_tls_ingress_component(overlay, tmp_path):
    """HTTPS only, HSTS, and the proxy's request-body limit equal to the service's own
    (UNDIFFUSE_MAX_BODY_BYTES), for the NGINX-based controllers the annotations are for."""
    from service.settings import Settings

    name, docs = overlay
    assert not [d for d in docs if d["kind"] == "Ingress"], "optional: a component"
    rendered = render_own_overlay(tmp_path, name, components=["components/tls-ingress"])
    (ingress,) = [d for d in rendered if d["kind"] == "Ingress"]
    _validate([ingress])
    assert ingress["metadata"]["namespace"] == "undiffuse"
    notes = ingress["metadata"]["annotations"]
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    limit = int(config.get("UNDIFFUSE_MAX_BODY_BYTES", Settings.model_fields["max_body_bytes"].default))
    assert _nginx_size(notes["nginx.org/client-max-body-size"]) == limit
    assert _nginx_size(notes["nginx.ingress.kubernetes.io/proxy-body-size"]) == limit
    assert notes["nginx.org/hsts"] == "true" and notes["nginx.org/hsts-include-subdomains"] == "true"
    assert int(notes["nginx.org/hsts-max-age"]) >= 365 * 24 * 3600
    assert (
        notes["ingress.kubernetes.io/ssl-redirect"] == notes["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    )
    spec = ingress["spec"]
    (tls,) = spec["tls"]
    assert tls["secretName"] and tls["hosts"] == [rule["host"] for rule in spec["rules"]]
    (path,) = spec["rules"][0]["http"]["paths"]
    backend = path["backend"]["service"]
    rayservice = _rayservice(rendered)
    # KubeRay's Service for the Serve proxies: <RayService>-serve-svc, on the head's serve port
    assert backend["name"] == f"{rayservice['metadata']['name']}-serve-svc"
    head = _ray_pods(rendered)["head"]["template"]
    serve_port = next(p for p in head["spec"]["containers"][0]["ports"] if p["name"] == "serve")["containerPort"]
    assert backend["port"]["number"] == serve_port and path["path"] == "/"
    assert _admitted(rendered, head["metadata"]["labels"], "ingress-nginx", {}, serve_port)
    assert re.search(r"proxy-body-size|client-max-body-size", DOCS) and "413" in DOCS


def test_the_redis_tls_component(overlay, tmp_path):
    """Redis on TLS only, with the base's options kept; every Ray pod connects with rediss://
    and checks the server against the CA it mounts from the Secret redis-tls."""
    from redis.connection import SSLConnection, parse_url

    name, docs = overlay
    rendered = render_own_overlay(tmp_path, name, components=["components/redis-tls"])
    _validate(rendered)
    (base,) = _redis(docs)["spec"]["template"]["spec"]["containers"]
    spec = _redis(rendered)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    _, base_options, base_config = _redis_command(base)
    _, options, config = _redis_command(container)
    assert config == base_config and base_options.items() <= options.items()
    assert options["--port"] == "0" and options["--tls-port"] == str(base["ports"][0]["containerPort"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes.get(m["name"]) for m in container["volumeMounts"]}
    for option in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        volume = mounts[os.path.dirname(options[option])]
        assert volume["secret"]["secretName"] == "redis-tls", option
    assert "--tls" in container["readinessProbe"]["exec"]["command"][-1]
    for pod, group in _ray_pods(rendered).items():
        pod_spec = group["template"]["spec"]
        env = _expand(pod_spec["containers"][0], {"REDIS_PASSWORD": SAMPLE_PASSWORD})
        url = parse_url(env["UNDIFFUSE_REDIS_URL"])
        assert url["connection_class"] is SSLConnection and url["host"] == "redis", pod
        assert url.get("ssl_cert_reqs", "required") == "required" and url.get("ssl_check_hostname", True), pod
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in pod_spec["containers"][0]["volumeMounts"]}
        secret = mounts[os.path.dirname(url["ssl_ca_certs"])]["secret"]
        assert secret["secretName"] == "redis-tls", pod
        assert secret["items"] == [{"key": "ca.crt", "path": os.path.basename(url["ssl_ca_certs"])}], pod
