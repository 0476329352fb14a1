"""The deploy files, checked as far as this machine allows: YAML parses, compose and Kubernetes
manifests reference each other consistently and validate against the Kubernetes schemas, nginx
accepts its config, and the Dockerfile copies files that exist and runs a real CLI command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.config import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"


def _k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":  # a kustomize file, not an API object
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [doc for doc in _k8s_documents() if doc["kind"] == kind]


def _setting_names() -> set[str]:
    return {f"PREFIX_SERVE_{name.upper()}" for name in ServeSettings.model_fields}


def test_every_yaml_parses() -> None:
    files = list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml"))
    assert len(files) >= 9
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_compose_references_are_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services, volumes, secrets = compose["services"], compose["volumes"], compose["secrets"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in volumes, (name, source)
        for secret in service.get("secrets", []):
            assert secret in secrets
        for variable in service.get("environment", {}):
            if variable.startswith("PREFIX_SERVE_"):
                assert variable in _setting_names(), variable
    replicas = [name for name, s in services.items() if s.get("image", "").startswith("prefix-serve")]
    assert len(replicas) == 2
    assert {services[r]["environment"]["PREFIX_SERVE_STORE"] for r in replicas} == {"redis://redis:6379/0"}
    upstreams = services["nginx"]["environment"]["UPSTREAM_SERVERS"]
    assert all(f"server {r}:8000" in upstreams for r in replicas)
    assert "--appendonly" in services["redis"]["command"]


@pytest.mark.parametrize("doc", _k8s_documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_kubernetes_manifests_validate_against_the_schemas(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_manifests_reference_each_other() -> None:
    (deployment,) = _by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        doc = next(d for d in _by_kind(kind) if d["metadata"]["name"] == "prefix-serve")
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    (ingress,) = _by_kind("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
    assert backend in {d["metadata"]["name"] for d in _by_kind("Service")}
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == "$http_x_task_id"
    )
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (config,) = _by_kind("ConfigMap")
    assert set(config["data"]) <= _setting_names()
    (secret,) = _by_kind("Secret")
    json.loads(secret["stringData"]["keys.json"])
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert pod["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    timeout = float(config["data"]["PREFIX_SERVE_REQUEST_TIMEOUT_S"]) + float(
        config["data"]["PREFIX_SERVE_SHUTDOWN_GRACE_S"]
    )
    assert pod["terminationGracePeriodSeconds"] > timeout
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )


def render_nginx_config(listen_port: int, upstreams: list[str], workdir: Path) -> Path:
    """The repo's nginx template rendered (as the nginx image does) inside a minimal main config
    that runs unprivileged in ``workdir``."""
    template = (DEPLOY / "nginx" / "prefix-serve.conf.template").read_text()
    servers = " ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams)
    site = template.replace("${LISTEN_PORT}", str(listen_port)).replace("${UPSTREAM_SERVERS}", servers)
    assert "${" not in site
    (workdir / "site.conf").write_text(site)
    main = workdir / "nginx.conf"
    main.write_text(
        f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/site.conf;
}}
"""
    )
    return main


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is required (apt-get install nginx; .ci/run installs it)"
    return binary


@pytest.mark.e2e
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    config = render_nginx_config(18080, ["127.0.0.1:18001", "127.0.0.1:18002"], tmp_path)
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "hash $prefix_serve_affinity consistent" in (tmp_path / "site.conf").read_text()


def test_dockerfile_copies_real_files_and_runs_a_real_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["prefix-serve"]
    assert build_parser().parse_args(command).handler.__name__ == "_serve"
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M)  # not root
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    for variable in re.findall(r"PREFIX_SERVE_[A-Z_]+", dockerfile):
        assert variable in _setting_names(), variable
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
