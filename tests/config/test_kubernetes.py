"""The Kubernetes deployment (deploy/kubernetes), rendered and validated offline.

Each overlay is rendered by kustomize (`kubectl kustomize`, tests/harness/manifests.py), alone and with the
optional components on top, and every object is validated:

- Kubernetes' own kinds against the OpenAPI schemas of Kubernetes 1.30 shipped in the
  kubernetes-validate package, in strict mode (an unknown field is an error);
- the custom resources, ServiceMonitor (prometheus-operator v0.80) and ScaledObject (KEDA v2.16),
  against the models that cloudcoil-models-* generate from those projects' published CRD
  schemas: types, enums and required fields, and, since the models drop fields they do not know,
  a round trip that must give back the manifest unchanged (so an unknown field is an error too).

Then the parts are held to each other and to the service: probes and ports, the drain timings
against CLIPLENS_SHUTDOWN_GRACE_S, CPU pools against CPU requests, selectors, the GPU variant, the
autoscaling query against the metric contract, the recording rule and the dashboard, the
collector's wiring, and the Prometheus scrape config without the operator. The optional shared
embedding cache (components/valkey-cache) is rendered the way a user enables it, by uncommenting
its line in each overlay, and held to the pods that use it and to the compose file's cache.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

from cliplens.settings import load_settings
from cliplens.telemetry.metrics import Metrics
from tests.harness.manifests import (
    KUBERNETES,
    OVERLAYS,
    ROOT,
    Manifest,
    container,
    find,
    render,
    render_directory,
    settings,
)
from tests.harness.tools import debian, required

KUBERNETES_VERSION = "1.30.0"
"""The Kubernetes release whose schemas the manifests must satisfy (strict)."""
CUSTOM_RESOURCES: dict[tuple[str, str], Any] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
}
OPTIONAL_COMPONENTS = ("gcs-key-secret", "gcs-workload-identity")
AUTOSCALERS = ("keda", "hpa-cpu")
NAMESPACE = "cliplens"
SHUTDOWN_MARGIN_S = (2, 15)
"""terminationGracePeriodSeconds - (preStop + CLIPLENS_SHUTDOWN_GRACE_S): enough to close the
lifespan after the drain, and not so much that a stuck pod lingers."""


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            found
            for key in sorted(set(expected) | set(actual))
            for found in differences(expected.get(key), actual.get(key), f"{path}.{key}")
        ]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            found
            for i, pair in enumerate(zip(expected, actual, strict=True))
            for found in differences(*pair, f"{path}[{i}]")
        ]
    return [] if expected == actual else [f"{path or '.'}: {expected!r} != {actual!r}"]


def validate(manifest: Manifest) -> None:
    """Raise when `manifest` does not satisfy its kind's schema (see the module docstring)."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key in CUSTOM_RESOURCES:
        model = CUSTOM_RESOURCES[key].model_validate(manifest)
        back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        unknown = differences(manifest, back)
        if unknown:
            raise ValueError(f"{manifest['kind']}: fields its schema does not have: {unknown}")
        return
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def variants() -> list[tuple[str, tuple[str, ...]]]:
    return [(overlay, ()) for overlay in OVERLAYS] + [
        (overlay, (component,)) for overlay in OVERLAYS for component in OPTIONAL_COMPONENTS
    ]


# ---- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "components"), variants(), ids=lambda v: "+".join(v) if v else "")
def test_every_object_of_every_variant_validates_against_its_schema(
    overlay: str, components: tuple[str, ...], tmp_path: Path
) -> None:
    manifests = render(overlay, components, tmp_path)
    assert manifests
    assert_valid_and_namespaced(manifests, f"{overlay} {components}")


def assert_valid_and_namespaced(manifests: list[Manifest], what: str) -> None:
    """Every object validates against its schema and, but the Namespace itself, is in NAMESPACE."""
    for manifest in manifests:
        try:
            validate(manifest)
        except Exception as exc:  # the message names the object and the field
            pytest.fail(f"{what}: {manifest['kind']}/{manifest['metadata']['name']}: {exc}")
        namespaced = manifest["kind"] != "Namespace"
        assert not namespaced or manifest["metadata"]["namespace"] == NAMESPACE, manifest["metadata"]


def test_the_validation_rejects_what_a_cluster_would_reject(rendered: dict[str, list[Manifest]]) -> None:
    """The checks above can fail: a misspelt field, a wrong type, a missing required field."""
    deployment = copy.deepcopy(find(rendered["cpu"], "Deployment", "cliplens"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(find(rendered["cpu"], "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "two"
    with pytest.raises(ValueError, match="minReplicaCount"):
        validate(scaled)
    scaled = copy.deepcopy(find(rendered["cpu"], "ScaledObject"))
    scaled["spec"]["triggers"][0]["metricsType"] = "AverageValue"
    with pytest.raises(ValueError, match="metricsType"):
        validate(scaled)
    monitor = copy.deepcopy(find(rendered["cpu"], "ServiceMonitor"))
    del monitor["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate(monitor)


def test_each_overlay_has_the_parts_the_issue_asks_for(rendered: dict[str, list[Manifest]]) -> None:
    for overlay, manifests in rendered.items():
        present = {(m["kind"], m["metadata"]["name"]) for m in manifests}
        for part in [
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "cliplens"),
            ("Deployment", "cliplens"),
            ("Service", "cliplens"),
            ("PodDisruptionBudget", "cliplens"),
            ("Deployment", "otel-collector"),
            ("Service", "otel-collector"),
            ("Deployment", "jaeger"),
            ("Service", "jaeger"),
        ]:
            assert part in present, (overlay, part)
        autoscalers = {kind for kind, _ in present} & {"ScaledObject", "HorizontalPodAutoscaler"}
        assert len(autoscalers) == 1, f"{overlay}: one autoscaler, never two on one Deployment"
        if overlay == "cpu-plain":
            assert autoscalers == {"HorizontalPodAutoscaler"}
            assert ("ServiceMonitor", "cliplens") not in present, "no CRD where there is no operator"
            assert ("PrometheusRule", "cliplens") not in present
        else:
            assert autoscalers == {"ScaledObject"}
            assert ("ServiceMonitor", "cliplens") in present
            assert ("PrometheusRule", "cliplens") in present
    for autoscaler in AUTOSCALERS:
        kustomization = yaml.safe_load(
            (KUBERNETES / "components" / autoscaler / "kustomization.yaml").read_text()
        )
        assert kustomization["kind"] == "Component"


def test_no_credential_is_in_the_repository(rendered: dict[str, list[Manifest]]) -> None:
    for manifests in rendered.values():
        assert "Secret" not in {m["kind"] for m in manifests}
    for path in KUBERNETES.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY" not in text and '"private_key"' not in text, path


def test_gcs_credentials_come_from_a_secret_made_in_the_cluster_or_from_workload_identity(
    tmp_path: Path,
) -> None:
    keyed = render("cpu", ("gcs-key-secret",), tmp_path / "key")
    pod = find(keyed, "Deployment", "cliplens")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    mount = next(
        m
        for m in container({"spec": {"template": {"spec": pod}}})["volumeMounts"]
        if m["name"] == volume["name"]
    )
    env = {e["name"]: e.get("value") for e in container({"spec": {"template": {"spec": pod}}})["env"]}
    assert (
        env["GOOGLE_APPLICATION_CREDENTIALS"]
        == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    )
    assert mount["readOnly"] is True
    assert "Secret" not in {m["kind"] for m in keyed}, "the Secret is created with kubectl, not shipped"
    bound = render("cpu", ("gcs-workload-identity",), tmp_path / "wi")
    account = find(bound, "ServiceAccount", "cliplens")
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    assert (
        find(bound, "Deployment", "cliplens")["spec"]["template"]["spec"]["serviceAccountName"] == "cliplens"
    )


# ---- the cliplens Deployment ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_worker_per_pod_with_probes_on_the_service_routes(
    overlay: str, rendered: dict[str, list[Manifest]]
) -> None:
    deployment = find(rendered[overlay], "Deployment", "cliplens")
    pod = deployment["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    app = container(deployment)
    assert app["command"][:2] == ["cliplens", "serve"] and "--workers" not in app["command"]
    port = app["command"][app["command"].index("--port") + 1]
    (http,) = app["ports"]
    assert http == {"name": "http", "containerPort": int(port), "protocol": "TCP"}
    assert app["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert app["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert app["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = app["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "room for the model's download"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"
    security = app["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_drain_fits_in_the_termination_grace_period(
    overlay: str, rendered: dict[str, list[Manifest]]
) -> None:
    """preStop (routing catches up) + the service's own drain + a margin = the pod's grace period."""
    deployment = find(rendered[overlay], "Deployment", "cliplens")
    app = container(deployment)
    command = app["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert pre_stop_s >= 5, "kube-proxy and ingress need a few seconds to drop the endpoint"
    grace_s = float(settings(rendered[overlay], deployment)["CLIPLENS_SHUTDOWN_GRACE_S"])
    period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    low, high = SHUTDOWN_MARGIN_S
    assert pre_stop_s + grace_s + low <= period <= pre_stop_s + grace_s + high, (pre_stop_s, grace_s, period)
    timeout_s = float(settings(rendered[overlay], deployment)["CLIPLENS_REQUEST_TIMEOUT_S"])
    assert timeout_s > grace_s, (
        "a request may outlive the drain: it then gets what finished, as `timeout` items"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_load_and_size_the_pools_to_the_cpu_request(
    overlay: str, rendered: dict[str, list[Manifest]]
) -> None:
    from cliplens.settings import load_settings

    manifests = rendered[overlay]
    deployment = find(manifests, "Deployment", "cliplens")
    environment = settings(manifests, deployment)
    loaded = load_settings(environment)
    cpu_request = float(container(deployment)["resources"]["requests"]["cpu"])
    assert loaded.cpu_workers == cpu_request, "one process sees every core of its node: size the pool"
    assert 1 <= loaded.model_threads <= cpu_request
    assert loaded.extremes_window_s >= 2 * 5, "every min/max must be scraped at least once (5 s)"
    assert loaded.otlp_endpoint == "http://otel-collector:4318"
    assert "memory" in container(deployment)["resources"]["limits"]
    env = {e["name"]: e for e in container(deployment)["env"]}
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    assert "service.instance.id=$(POD_NAME)" in attributes, "each replica's spans say which pod made them"
    names = list(env)
    assert all(
        names.index(var) < names.index("OTEL_RESOURCE_ATTRIBUTES")
        for var in re.findall(r"\$\((\w+)\)", attributes)
    )


def test_the_gpu_variant_asks_for_one_gpu_on_gpu_nodes(rendered: dict[str, list[Manifest]]) -> None:
    gpu = find(rendered["gpu"], "Deployment", "cliplens")
    pod = gpu["spec"]["template"]["spec"]
    app = container(gpu)
    assert app["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert settings(rendered["gpu"], gpu)["CLIPLENS_DEVICE"] == "cuda"
    assert app["image"].endswith("-cuda")
    for overlay in ("cpu", "cpu-plain"):
        cpu = find(rendered[overlay], "Deployment", "cliplens")
        assert "nvidia.com/gpu" not in str(cpu)
        assert settings(rendered[overlay], cpu)["CLIPLENS_DEVICE"] == "cpu"
        assert not container(cpu)["image"].endswith("-cuda")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_budget_monitor_and_autoscaler_point_at_the_deployment(
    overlay: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[overlay]
    deployment = find(manifests, "Deployment", "cliplens")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(manifests, "Service", "cliplens")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["name"] == "http"
    budget = find(manifests, "PodDisruptionBudget", "cliplens")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        scalers = [m for m in manifests if m["kind"] == kind]
        for scaler in scalers:
            assert scaler["spec"]["scaleTargetRef"]["name"] == "cliplens"
            assert scaler["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            minimum = scaler["spec"].get("minReplicaCount", scaler["spec"].get("minReplicas"))
            assert minimum >= 2, "one replica may drain or restart while another serves"
            assert budget["spec"]["maxUnavailable"] < minimum
    monitors = [m for m in manifests if m["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
        window = float(settings(manifests, deployment)["CLIPLENS_EXTREMES_WINDOW_S"])
        assert 2 * float(endpoint["interval"].removesuffix("s")) <= window
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_name"],
            "targetLabel": "instance",
            "action": "replace",
        } in (endpoint["relabelings"]), "the dashboard's `instance` variable lists pods by name"


# ---- autoscaling ------------------------------------------------------------------------------


def trigger(manifests: list[Manifest]) -> dict[str, Any]:
    (found,) = find(manifests, "ScaledObject")["spec"]["triggers"]
    return dict(found)


def test_keda_scales_on_images_in_flight_per_replica_from_the_metric_contract(
    rendered: dict[str, list[Manifest]],
) -> None:
    exported = {family.name for family in Metrics().registry.collect()}
    for overlay in ("cpu", "gpu"):
        manifests = rendered[overlay]
        found = trigger(manifests)
        assert found["type"] == "prometheus" and found["metricType"] == "AverageValue"
        query = found["metadata"]["query"]
        metrics = set(re.findall(r"cliplens_[a-z_]+", query))
        assert metrics == {"cliplens_images_in_flight"} <= exported
        assert f'namespace="{NAMESPACE}"' in query, "the overlay's namespace, or another one's pods count"
        service = find(manifests, "Service", "cliplens")["metadata"]["name"]
        assert f'job="{service}"' in query, "the ServiceMonitor names the job after the Service"
        assert query.startswith("sum("), "AverageValue divides the sum over replicas by the replica count"
        threshold = float(found["metadata"]["threshold"])
        deployment = find(manifests, "Deployment", "cliplens")
        bound = float(settings(manifests, deployment)["CLIPLENS_MAX_IMAGES_IN_FLIGHT"])
        assert 0 < threshold <= bound / 4, "scale out long before admission control answers 429"
    assert trigger(rendered["gpu"])["metadata"]["query"] == trigger(rendered["cpu"])["metadata"]["query"]
    assert float(trigger(rendered["gpu"])["metadata"]["threshold"]) > float(
        trigger(rendered["cpu"])["metadata"]["threshold"]
    )


def test_the_keda_query_is_the_recorded_signal_and_the_dashboard_draws_it(
    rendered: dict[str, list[Manifest]],
) -> None:
    query = trigger(rendered["cpu"])["metadata"]["query"]
    window = re.search(r"\[(\w+)\]", query)
    assert window
    rules = {
        rule["record"]: rule["expr"]
        for path in (ROOT / "observability" / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    signal = " ".join(rules["job:cliplens_images_in_flight:per_replica_avg30s"].split())
    assert f"avg_over_time(cliplens_images_in_flight[{window.group(1)}])" in signal
    target = rules["cliplens:images_in_flight_per_replica_target"]
    assert float(re.fullmatch(r"vector\(([0-9.]+)\)", target.strip()).group(1)) == float(  # type: ignore[union-attr]
        trigger(rendered["cpu"])["metadata"]["threshold"]
    )
    spec = importlib.util.spec_from_file_location(
        "generate_dashboard", ROOT / "grafana" / "generate_dashboard.py"
    )
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert window.group(1) == generator.AUTOSCALING_WINDOW
    drawn = generator.images_in_flight_per_replica()
    assert f"avg_over_time(cliplens_images_in_flight{{{generator.INSTANCE}}}[{window.group(1)}])" in drawn


def test_the_cpu_fallback_hpa_targets_cpu_utilisation(rendered: dict[str, list[Manifest]]) -> None:
    hpa = find(rendered["cpu-plain"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100
    assert container(find(rendered["cpu-plain"], "Deployment", "cliplens"))["resources"]["requests"]["cpu"]


# ---- traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_send_otlp_to_the_collector_which_forwards_to_jaeger(
    overlay: str, rendered: dict[str, list[Manifest]]
) -> None:
    manifests = rendered[overlay]
    collector = find(manifests, "Deployment", "otel-collector")
    (config_volume,) = collector["spec"]["template"]["spec"]["volumes"]
    config_map = find(manifests, "ConfigMap", config_volume["configMap"]["name"])
    (config_text,) = config_map["data"].values()
    config = yaml.safe_load(config_text)
    pipeline = config["service"]["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline[section]) <= set(config[section]), section
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    service_ports = {p["port"] for p in find(manifests, "Service", "otel-collector")["spec"]["ports"]}
    for protocol in ("grpc", "http"):
        port = int(config["receivers"]["otlp"]["protocols"][protocol]["endpoint"].rpartition(":")[2])
        assert port in service_ports
    endpoint = settings(manifests, find(manifests, "Deployment", "cliplens"))["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, _, host_port = endpoint.removeprefix("http://").partition(":")
    assert host == "otel-collector" and int(host_port) in service_ports
    (exporter,) = pipeline["exporters"]
    jaeger_host, _, jaeger_port = config["exporters"][exporter]["endpoint"].partition(":")
    jaeger = find(manifests, "Service", jaeger_host)
    assert int(jaeger_port) in {p["port"] for p in jaeger["spec"]["ports"]}
    health = int(config["extensions"]["health_check"]["endpoint"].rpartition(":")[2])
    probe_port = container(collector, "otel-collector")["readinessProbe"]["httpGet"]["port"]
    assert {p["name"]: p["containerPort"] for p in container(collector, "otel-collector")["ports"]}[
        probe_port
    ] == health
    for deployment in (m for m in manifests if m["kind"] == "Deployment"):
        for spec in deployment["spec"]["template"]["spec"]["containers"]:
            repository, _, tag = spec["image"].rpartition(":")
            assert repository and tag and tag != "latest", spec["image"]


# ---- Prometheus rules -------------------------------------------------------------------------


def test_the_operator_gets_the_projects_rules_unchanged(rendered: dict[str, list[Manifest]]) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_prometheusrule", KUBERNETES / "generate_prometheusrule.py"
    )
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.main(["--check"]) == 0, "run: python deploy/kubernetes/generate_prometheusrule.py"
    on_disk = [
        group
        for path in sorted((ROOT / "observability" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]
    for overlay in ("cpu", "gpu"):
        assert find(rendered[overlay], "PrometheusRule", "cliplens")["spec"]["groups"] == on_disk


# ---- Prometheus without the operator ----------------------------------------------------------


def test_the_plain_prometheus_config_reads_the_pod_annotations_and_passes_promtool(
    tmp_path: Path, rendered: dict[str, list[Manifest]]
) -> None:
    """Debian's Prometheus is built without Kubernetes discovery, so promtool checks the config with
    that one block swapped for a static one; the relabelling itself runs on a real Prometheus in
    tests/integration/test_replicas.py."""
    source = KUBERNETES / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(source.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cliplens"
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod" and discovery["namespaces"]["names"] == [NAMESPACE]
    annotations = find(rendered["cpu-plain"], "Deployment", "cliplens")["spec"]["template"]["metadata"][
        "annotations"
    ]
    read = {
        label.removeprefix("__meta_kubernetes_pod_annotation_")
        for relabel in job["relabel_configs"]
        for label in relabel.get("source_labels", [])
        if label.startswith("__meta_kubernetes_pod_annotation_")
    }
    assert read == {re.sub(r"[^a-zA-Z0-9_]", "_", name) for name in annotations}
    compose_config = yaml.safe_load((ROOT / "observability" / "prometheus.yml").read_text())
    assert config["rule_files"] == compose_config["rule_files"]
    assert config["global"] == compose_config["global"]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    shutil.copytree(ROOT / "observability" / "rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [required("promtool", debian("prometheus")), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the shared embedding cache (components/valkey-cache) -------------------------------------

CACHE_COMPONENT = "../../components/valkey-cache"
CACHE_OBJECTS = {
    ("Deployment", "cliplens-cache"),
    ("Service", "cliplens-cache"),
    ("NetworkPolicy", "cliplens-cache"),
}


def with_cache(overlay: str, workdir: Path) -> list[Manifest]:
    """`overlay` with the cache enabled as its kustomization tells users to: the commented
    component line uncommented (in a copy of deploy/kubernetes)."""
    tree = workdir / "kubernetes"
    shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("__pycache__"))
    kustomization = tree / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    line = f"  # - {CACHE_COMPONENT}\n"
    assert text.count(line) == 1, f"{overlay}: the overlay offers the cache, commented"
    kustomization.write_text(text.replace(line, f"  - {CACHE_COMPONENT}\n"))
    return render_directory(kustomization.parent)


def environment(manifests: list[Manifest], deployment: Manifest) -> dict[str, str]:
    """What the cliplens container's process sees: its ConfigMaps, then its own `env` values."""
    found = settings(manifests, deployment)
    found.update({e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e})
    return found


def server_flags(args: list[str]) -> dict[str, str]:
    """`valkey-server --name value ...` as {"--name": "value"}: every option of the cache takes one."""
    assert args[0] == "valkey-server" and len(args) % 2 == 1, args
    return dict(zip(args[1::2], args[2::2], strict=True))


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi) or a Valkey size (mb, gb), in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "Mi": 2**20, "Gi": 2**30, "mb": 2**20, "gb": 2**30}[unit]


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Manifest]]:
    return {overlay: with_cache(overlay, tmp_path_factory.mktemp(overlay)) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cache_adds_its_own_objects_and_only_the_url_to_the_pods_settings(
    overlay: str, rendered: dict[str, list[Manifest]], cached: dict[str, list[Manifest]]
) -> None:
    manifests = cached[overlay]
    assert_valid_and_namespaced(manifests, f"{overlay} + cache")
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    without = {(m["kind"], m["metadata"]["name"]) for m in rendered[overlay]}
    changed = names ^ without
    assert {part for part in changed if part[0] != "ConfigMap"} == CACHE_OBJECTS
    before = settings(rendered[overlay], find(rendered[overlay], "Deployment", "cliplens"))
    after = settings(manifests, find(manifests, "Deployment", "cliplens"))
    assert set(after) - set(before) == {"CLIPLENS_CACHE_URL"}
    assert {k: v for k, v in after.items() if k in before} == before, "the overlay's own settings stay"
    app = find(manifests, "Deployment", "cliplens")
    assert "initContainers" not in app["spec"]["template"]["spec"], "no pod waits for the cache"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_cliplens_pod_reads_the_cache_through_its_service(
    overlay: str, cached: dict[str, list[Manifest]]
) -> None:
    manifests = cached[overlay]
    deployment = find(manifests, "Deployment", "cliplens")
    env = environment(manifests, deployment)
    url = env["CLIPLENS_CACHE_URL"]
    parts = urlsplit(url)
    service = find(manifests, "Service", "cliplens-cache")
    assert parts.scheme == "redis" and parts.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert parts.port == port["port"] and parts.path == "/0"
    valkey_deployment = find(manifests, "Deployment", "cliplens-cache")
    pod = valkey_deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    valkey = container(valkey_deployment, "valkey")
    container_ports = {p["name"]: p["containerPort"] for p in valkey["ports"]}
    assert container_ports[port["targetPort"]] == int(server_flags(valkey["args"]).get("--port", "6379"))
    # The Service's links put CLIPLENS_CACHE_* variables of their own into every pod of the namespace
    # (enableServiceLinks is on by default): the settings must take them along with the URL.
    host, number = "10.96.0.10", port["port"]
    links = {
        "CLIPLENS_CACHE_SERVICE_HOST": host,
        "CLIPLENS_CACHE_SERVICE_PORT": str(number),
        f"CLIPLENS_CACHE_SERVICE_PORT_{port['name'].upper()}": str(number),
        "CLIPLENS_CACHE_PORT": f"tcp://{host}:{number}",
        f"CLIPLENS_CACHE_PORT_{number}_TCP": f"tcp://{host}:{number}",
        f"CLIPLENS_CACHE_PORT_{number}_TCP_PROTO": "tcp",
        f"CLIPLENS_CACHE_PORT_{number}_TCP_PORT": str(number),
        f"CLIPLENS_CACHE_PORT_{number}_TCP_ADDR": host,
    }
    assert load_settings({**env, **links}).cache_url == url
    # No password: only the cliplens pods may open a connection (where the network plugin enforces it).
    policy = find(manifests, "NetworkPolicy", "cliplens-cache")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    api_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert (
        source["podSelector"]["matchLabels"].items() <= api_labels.items()
        and "namespaceSelector" not in source
    )
    assert [p["port"] for p in rule["ports"]] == [port["targetPort"]]


def test_valkey_runs_non_root_as_the_same_memory_only_lru_cache_as_in_compose(
    cached: dict[str, list[Manifest]],
) -> None:
    deployment = find(cached["cpu"], "Deployment", "cliplens-cache")
    assert deployment["spec"]["replicas"] == 1, "one cache: every replica must see the same entries"
    pod = deployment["spec"]["template"]["spec"]
    (valkey,) = pod["containers"]
    options = server_flags(valkey["args"])
    assert options["--maxmemory-policy"] == "allkeys-lru"
    assert options["--save"] == "" and options["--appendonly"] == "no", "nothing on disk"
    assert quantity_bytes(valkey["resources"]["limits"]["memory"]) >= 1.5 * quantity_bytes(
        options["--maxmemory"]
    ), "room above the entries for the server itself, client buffers and fragmentation"
    assert valkey["resources"]["requests"]["cpu"] and valkey["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = valkey["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # The image's entrypoint refuses a working directory (/data) it cannot write to.
    (mount,) = valkey["volumeMounts"]
    assert mount["mountPath"] == "/data"
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    probe = " ".join(valkey["readinessProbe"]["exec"]["command"])
    assert "valkey-cli ping" in probe
    assert pod["automountServiceAccountToken"] is False
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["cache"]
    assert valkey["image"] == compose["image"], "one Valkey release, in compose and on Kubernetes"
    assert valkey["args"] == compose["command"], "the same cache configuration"
