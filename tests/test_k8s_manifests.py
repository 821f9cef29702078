"""docker/k8s/: every manifest is valid Kubernetes, and the manifests fit together.

Schema validation is offline: the `kubernetes-validate` package ships the JSON schemas of
each Kubernetes release. Beyond the schemas: every ConfigMap, Secret and key a pod names
exists; Services, PodDisruptionBudgets and the autoscaler select what exists; probes and
annotations use the ports the configuration makes the server listen on; and the TOML in
the ConfigMap loads with ExpBuild's own settings loader.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from expbuild.config import load_settings, parse_address

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
# The oldest release with every field used (appArmorProfile: 1.30), and the newest shipped.
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def documents() -> list[dict]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def named(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def pod_specs() -> dict[str, dict]:
    return {name: d["spec"]["template"] for name, d in named("Deployment").items()}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelled_field():
    deployment = copy.deepcopy(named("Deployment")["expbuild-server"])
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_everything_lives_in_one_namespace():
    namespaces = {d["metadata"].get("namespace") for d in documents() if d["kind"] != "Namespace"}
    assert namespaces == set(named("Namespace"))


def test_pods_name_only_config_and_secrets_that_exist():
    config_maps, secrets = named("ConfigMap"), named("Secret")
    claims = named("PersistentVolumeClaim")

    def secret_keys(name: str) -> set[str]:
        return set(secrets[name].get("stringData", {})) | set(secrets[name].get("data", {}))

    for name, template in pod_specs().items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, (name, volume)
            if "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert secret in secrets, (name, volume)
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret_keys(secret), (name, item)
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, mount)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys(ref["name"]), (name, env)
            config = container["args"][container["args"].index("--config") + 1]
            assert any(
                Path(config).parent == Path(m["mountPath"])
                and "configMap" in volumes[m["name"]]
                and Path(config).name
                in config_maps[volumes[m["name"]]["configMap"]["name"]]["data"]
                for m in container["volumeMounts"]
            ), f"{name}: --config {config} is not a mounted ConfigMap key"


def test_selectors_match_what_they_select():
    templates = pod_specs()

    def selects(selector: dict[str, str]) -> set[str]:
        return {
            name
            for name, template in templates.items()
            if selector.items() <= template["metadata"]["labels"].items()
        }

    for name, deployment in named("Deployment").items():
        assert selects(deployment["spec"]["selector"]["matchLabels"]) == {name}
    for name, service in named("Service").items():
        assert selects(service["spec"]["selector"]) == {"expbuild-server"}, name
    for name, budget in named("PodDisruptionBudget").items():
        assert selects(budget["spec"]["selector"]["matchLabels"]) == {name}
    (autoscaler,) = named("HorizontalPodAutoscaler").values()
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] == "expbuild-worker"
    assert target["name"] in named("Deployment")
    assert autoscaler["spec"]["metrics"][0]["external"]["metric"]["name"] == (
        "expbuild_tasks_queued"
    )


def test_probes_and_ports_follow_the_server_configuration(tmp_path):
    settings = _config_settings("server.toml", tmp_path)
    _, grpc_port = parse_address(settings.server.address, "server.address")
    _, metrics_port = parse_address(settings.server.metrics_address, "server.metrics_address")
    template = pod_specs()["expbuild-server"]
    (server,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port, probe  # grpc.health.v1
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert settings.cas.root in {m["mountPath"] for m in server["volumeMounts"]}
    for service in named("Service").values():
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port


def test_worker_configuration_loads_and_points_at_the_service(tmp_path):
    settings = _config_settings("worker.toml", tmp_path)
    service = named("Service")["expbuild"]
    namespace = service["metadata"]["namespace"]
    host = f"{service['metadata']['name']}.{namespace}.svc"
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert settings.worker.server_target == f"{host}:{grpc}"
    (worker,) = pod_specs()["expbuild-worker"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert settings.worker.backend.work_dir in mounts
    assert str(settings.worker.cache_dir) in mounts


def _config_settings(name: str, tmp_path: Path):
    path = tmp_path / name
    path.write_text(named("ConfigMap")["expbuild-config"]["data"][name])
    return load_settings(str(path))
