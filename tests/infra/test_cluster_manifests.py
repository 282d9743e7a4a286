"""Cluster deployment files (infra/k8s, infra/docker): they parse, agree with each other and with
the flow, and hold no credentials. No cluster, no network, no Docker."""

import inspect
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
# Prefect's own placeholder pattern (prefect.utilities.templating.PLACEHOLDER_CAPTURE_REGEX).
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}"
    return found[0]


def _template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((K8S / "prefect.yaml").read_text())["deployments"]}


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_every_yaml_parses():
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"prefect.yaml", "worker.yaml", "dask-cluster.yaml"}
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f.name
    for name in ("worker.yaml", "dask-cluster.yaml"):
        for d in _docs(name):
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), (name, d.get("kind"))
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == "kdnas", (name, d["kind"], d["metadata"]["name"])


def test_job_template_placeholders_are_declared_variables():
    t = _template()
    assert set(t) == {"job_configuration", "variables"}
    props = t["variables"]["properties"]
    used = set(PLACEHOLDER.findall(json.dumps(t["job_configuration"])))
    assert used, "no placeholders found"
    assert used <= props.keys(), f"undeclared: {sorted(used - props.keys())}"
    # what kdnas adds on top of prefect-kubernetes' default template
    assert {"image", "cpu_request", "memory_limit", "gpu_limit", "cache_pvc", "credentials_secret"} <= used


def test_job_template_mounts_the_cache_and_loads_credentials_from_a_secret():
    t = _template()
    props = t["variables"]["properties"]
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "prefect-job"  # the Kubernetes worker requires this container name
    assert c["image"] == "{{ image }}" and props["image"]["default"] == "kdnas:latest"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert props["gpu_limit"]["default"] is None  # no GPU requested unless asked for
    assert c["envFrom"] == [{"secretRef": {"name": "{{ credentials_secret }}"}}]
    (mount,) = c["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/cache"}
    assert volume["persistentVolumeClaim"]["claimName"] == "{{ cache_pvc }}"
    env = props["env"]["default"]
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/cache/")
    # the names the template defaults to are the objects the manifests create
    cluster = _docs("worker.yaml") + _docs("dask-cluster.yaml")
    pvc = _find(cluster, "PersistentVolumeClaim", props["cache_pvc"]["default"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    _find(cluster, "Namespace", props["namespace"]["default"])


# A credential written into a file, as opposed to a reference to a Secret or a "..." placeholder.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)(secret_access_key|secret[_-]?key|password|passwd|token|api[_-]?key)[\"']?\s*[:=]\s*[\"']?(?!\.\.\.)[A-Za-z0-9/+_\-]{6,}"),
    re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URL
    # AWS-secret-shaped: 40 base64 characters mixing upper case, lower case and digits
    re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[0-9])(?=[A-Za-z0-9/+]{0,39}[a-z])"
               r"(?=[A-Za-z0-9/+]{0,39}[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
]


def _credentials_in(text: str) -> list[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


@pytest.mark.parametrize("sample", [
    "AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE",
    "- name: AWS_SECRET_ACCESS_KEY\n  value: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "password: hunter2hunter2",
    '"MLFLOW_TRACKING_URI": "http://admin:s3cret@mlflow:5000"',
])
def test_the_credential_check_catches_literal_credentials(sample):
    assert _credentials_in(sample)


def test_no_manifest_holds_a_literal_credential():
    files = [*sorted(K8S.glob("*")), DOCKERFILE]
    for f in files:
        assert not _credentials_in(f.read_text()), f.name
    for name in ("worker.yaml", "dask-cluster.yaml"):
        for d in _docs(name):
            assert d["kind"] != "Secret", "Secrets are created by the operator, never committed"
            if d["kind"] in ("Deployment", "StatefulSet", "Job"):
                for c in _containers(d):
                    for e in c.get("env", []):
                        if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY", e["name"]):
                            assert "value" not in e, f"{name}: {e['name']} must come from a Secret"
    secret_like = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY")
    assert not [k for k in _template()["variables"]["properties"]["env"]["default"] if secret_like.search(k)]
    for dep in _deployments().values():
        assert not [k for k in dep["work_pool"].get("job_variables", {}).get("env", {}) if secret_like.search(k)]


def test_deployments_run_the_kdnas_flow_with_valid_parameters():
    from prefect import Flow

    from flows.search import kdnas
    from kdnas_core.config import load_config

    assert isinstance(kdnas, Flow) and kdnas.name == "kdnas"
    accepted = set(inspect.signature(kdnas.fn).parameters)
    spec = yaml.safe_load((K8S / "prefect.yaml").read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/kdnas"}}]
    deps = _deployments()
    assert set(deps) == {"search", "search-dask"}
    props = _template()["variables"]["properties"]
    for name, dep in deps.items():
        assert dep["entrypoint"] == "flows/search.py:kdnas", name
        assert dep["work_pool"]["name"] == "kdnas-k8s", name
        assert set(dep["work_pool"]["job_variables"]) <= props.keys(), name
        params = dep["parameters"]
        assert set(params) <= accepted, name
        # the overrides make a valid config (relative config_path: the image's WORKDIR is the repo)
        cfg = load_config(ROOT / params["config_path"], params.get("overrides"))
        assert str(cfg.paths.cache_dir) == "/cache", name
    assert deps["search"]["schedules"][0]["cron"] == "0 3 * * 0"
    assert deps["search-dask"]["parameters"]["overrides"]["runner.kind"] == "dask"


def test_dask_workers_and_dask_deployment_point_at_the_scheduler_service():
    docs = _docs("dask-cluster.yaml")
    svc = _find(docs, "Service", "kdnas-dask-scheduler")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "scheduler")
    address = f"tcp://{svc['metadata']['name']}:{port}"
    scheduler = _find(docs, "Deployment", "kdnas-dask-scheduler")
    assert svc["spec"]["selector"].items() <= scheduler["spec"]["template"]["metadata"]["labels"].items()
    assert str(port) in _containers(scheduler)[0]["command"]
    worker = _find(docs, "Deployment", "kdnas-dask-worker")
    (c,) = _containers(worker)
    assert c["command"][:3] == ["dask", "worker", address]
    assert worker["spec"]["replicas"] == 2
    assert {"secretRef": {"name": _template()["variables"]["properties"]["credentials_secret"]["default"]}} in c["envFrom"]
    assert {"configMapRef": {"name": "kdnas-prefect"}} in c["envFrom"]
    (mount,) = c["volumeMounts"]
    (volume,) = worker["spec"]["template"]["spec"]["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/cache"}
    _find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert _deployments()["search-dask"]["parameters"]["overrides"]["runner.address"] == address


def test_worker_serves_the_pool_with_a_namespaced_role():
    docs = _docs("worker.yaml")
    dep = _find(docs, "Deployment", "kdnas-prefect-worker")
    (c,) = _containers(dep)
    cmd = c["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == "kdnas-k8s" and cmd[cmd.index("--type") + 1] == "kubernetes"
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    binding = _find(docs, "RoleBinding", "kdnas-prefect-worker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "kdnas"}]
    role = _find(docs, "Role", binding["roleRef"]["name"])
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for verb in ("create", "watch", "delete", "get", "list"):
        assert ("batch", "jobs", verb) in allowed
    for res in ("pods", "pods/log", "events"):
        assert ("", res, "get") in allowed
    # a namespaced Role only covers the worker if its observer stays in the namespace too
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "kdnas"
    assert {"configMapRef": {"name": "kdnas-prefect"}} in c["envFrom"]
    _find(docs, "ConfigMap", "kdnas-prefect")


def test_dockerfile_matches_the_project_pins_and_the_pods():
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(rf"pip install [^\n]*{re.escape(torch_pin)}\b", text)
    assert "dask" in project["optional-dependencies"] and "/opt/kdnas[dask]" in text
    assert "prefect-kubernetes" in text
    assert re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1] == "/opt/kdnas"
    # the pods set runAsNonRoot, which needs a numeric non-root USER
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    assert user.isdigit() and int(user) != 0
    for var in ("DO_NOT_TRACK=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert var in text
