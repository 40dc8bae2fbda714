"""`docker compose up --scale api=N`: the compose file, its proxy and Prometheus agree on replicas.

No container runs here (CI has no Docker engine). The proxy's configuration goes through the real
HAProxy parser (`haproxy -c`, Debian's 2.6; the compose image is 3.0, which reads the same
keywords) and is held to the compose file: it balances over the `api` service's name and port,
through Docker's DNS, checks /readyz, and outlasts the service's own request deadline; Prometheus
finds each replica by the same name. tests/integration/test_replicas.py runs this same proxy
configuration in front of three real replicas.

The replicas also share one embedding cache, the `cache` service (Valkey): the file as a Compose CLI
reads it (`docker compose config`, or the standalone `docker-compose`) must run it as a memory-only
LRU cache, point every replica at it, and never make a replica wait for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cliplens.settings import Settings, load_settings
from tests.harness.replicas import COMPOSE_HAPROXY, Haproxy, haproxy_config
from tests.harness.tools import debian, required

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict[str, Any]]:
    """The services as Compose itself reads docker-compose.yml: parsed, interpolated, normalised."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        command = [docker, "compose"]
    else:
        command = [required("docker-compose", debian("docker-compose"))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPLENS_", "GOOGLE_", "PHOTO_"))}
    result = subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"])


def directives(text: str, section: str) -> list[str]:
    """The lines of one section (`backend cliplens`, `defaults`, ...) of an HAProxy config."""
    lines = text.splitlines()
    start = lines.index(section)
    body = []
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        if line.strip() and not line.strip().startswith("#"):
            body.append(" ".join(line.split()))
    return body


def test_haproxy_accepts_the_compose_proxy_config_and_the_one_the_tests_derive(tmp_path: Path) -> None:
    result = subprocess.run(
        [Haproxy.binary(), "-c", "-f", str(COMPOSE_HAPROXY)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    derived = tmp_path / "haproxy.cfg"
    derived.write_text(haproxy_config(["127.0.0.1:18001", "127.0.0.1:18002"], 18000))
    result = subprocess.run([Haproxy.binary(), "-c", "-f", str(derived)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_api_has_no_host_port_and_the_proxy_is_the_one_address(
    services: dict[str, dict[str, Any]],
) -> None:
    api, proxy = services["api"], services["proxy"]
    assert "ports" not in api and "container_name" not in api, "`--scale api=N` needs both gone"
    assert api["expose"] == ["8000"]
    assert proxy["ports"] == ["8000:8000"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in proxy["volumes"]}
    assert mounts["/usr/local/etc/haproxy/haproxy.cfg"] == "./deploy/compose/haproxy.cfg"
    assert proxy["image"].startswith("haproxy:3.")
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"


def test_the_proxy_balances_requests_over_every_ready_replica_of_the_api_service() -> None:
    text = COMPOSE_HAPROXY.read_text()
    backend = directives(text, "backend cliplens")
    (template,) = [d for d in backend if d.startswith("server-template ")]
    _, _name, slots, address, *options = template.split()
    assert address == "api:8000", "the compose service's name and the port `cliplens serve` listens on"
    assert int(slots) >= 3 and "resolvers docker" in " ".join(options) and "check" in options
    assert "balance roundrobin" in backend
    assert "option httpchk GET /readyz" in backend and "http-check expect status 200" in backend
    assert "nameserver docker 127.0.0.11:53" in directives(text, "resolvers docker"), "Docker's embedded DNS"
    defaults = directives(text, "defaults")
    assert "mode http" in defaults, "HTTP mode balances each request, not each connection"
    server_timeout = next(d for d in defaults if d.startswith("timeout server "))
    assert float(server_timeout.split()[-1].removesuffix("s")) > Settings.request_timeout_s
    retry_on = next(d for d in defaults if d.startswith("retry-on "))
    assert {"conn-failure", "503"} <= set(retry_on.split()[1:]), "a draining replica's 503 goes elsewhere"
    assert "option http-buffer-request" in defaults, "only a buffered request can be retried"
    assert re.search(r"^ *bind :8000$", text, re.MULTILINE)


def test_prometheus_finds_each_replica_by_the_service_name(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((ROOT / "observability" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cliplens"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["api"] and discovery["type"] == "A"
    assert str(discovery["port"]) == services["api"]["expose"][0]
    assert "static_configs" not in job


# ---- the shared embedding cache ---------------------------------------------------------------


def flags(command: list[str]) -> dict[str, str]:
    """`valkey-server --name value ...` as {"--name": "value"}: every option of the cache takes one."""
    assert command[0] == "valkey-server" and len(command) % 2 == 1, command
    return dict(zip(command[1::2], command[2::2], strict=True))


def waits_on(services: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    """Every service `name` waits for before it starts, directly or through another, with the
    condition it waits for."""
    found: dict[str, str] = {}
    pending = [name]
    while pending:
        for dependency, condition in (services[pending.pop()].get("depends_on") or {}).items():
            if dependency not in found:
                found[dependency] = condition.get("condition", "service_started")
                pending.append(dependency)
    return found


def test_the_cache_is_valkey_holding_entries_in_memory_only_and_evicting_the_least_recently_used(
    resolved: dict[str, dict[str, Any]],
) -> None:
    cache = resolved["cache"]
    repository, _, tag = cache["image"].rpartition(":")
    assert repository == "valkey/valkey" and re.fullmatch(r"8\.\d+\.\d+(-alpine)?", tag), "pin one 8.x"
    options = flags(cache["command"])
    assert options["--maxmemory-policy"] == "allkeys-lru", "every key is a cache entry: evict any of them"
    assert re.fullmatch(r"\d+mb", options["--maxmemory"]), "a bound, or it grows until the host says no"
    assert options["--save"] == "", "no RDB snapshots"
    assert options["--appendonly"] == "no", "no append-only file"
    assert "volumes" not in cache, "nothing of the cache outlives its container"
    assert "ports" not in cache, "only the api replicas talk to it"
    health = " ".join(cache["healthcheck"]["test"])
    assert "valkey-cli ping" in health
    assert cache["restart"] == "unless-stopped"


def test_every_api_replica_shares_the_cache_and_none_waits_for_it(
    resolved: dict[str, dict[str, Any]],
) -> None:
    api, cache = resolved["api"], resolved["cache"]
    url = api["environment"]["CLIPLENS_CACHE_URL"]
    assert load_settings(api["environment"]).cache_url == url, "the service reads it as its shared tier"
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.hostname == "cache", "the cache service's name, by Docker's DNS"
    port = flags(cache["command"]).get("--port", "6379")
    assert str(parts.port) == port and port in cache["expose"]
    assert parts.path == "/0"
    networks = {"default"}
    assert set(api.get("networks") or networks) & set(cache.get("networks") or networks), "one network"
    # A slow or dead cache is bypassed, never a failed request: nothing the api (or the proxy in front
    # of it) waits for may be the cache's health.
    for name in ("api", "proxy"):
        assert waits_on(resolved, name).get("cache", "service_started") == "service_started", name
