"""The Kubernetes manifests of deploy/kubernetes, rendered as a cluster would receive them.

Rendering is kustomize's own: `kubectl kustomize` (the kustomize built into kubectl, v5 or later,
offline; the machine image ships kubectl). A missing or too old kubectl fails the tests with
advice: nothing is skipped, and no home-made renderer stands in for kustomize's patch semantics.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.harness.tools import required

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "cpu-plain")
MINIMUM_KUSTOMIZE = (5, 0)

Manifest = dict[str, Any]


def kubectl() -> str:
    binary = required(
        "kubectl",
        "the manifests are rendered with `kubectl kustomize` (kustomize v5+). "
        "Install kubectl from the Kubernetes or Google Cloud apt repository.",
    )
    version = json.loads(
        subprocess.run([binary, "version", "--client", "-o", "json"], capture_output=True, text=True).stdout
    ).get("kustomizeVersion", "v0.0")
    major_minor = tuple(int(part) for part in version.lstrip("v").split(".")[:2])
    if major_minor < MINIMUM_KUSTOMIZE:
        raise AssertionError(f"kubectl's kustomize is {version}; the manifests need v5 or later")
    return binary


def render_directory(directory: Path) -> list[Manifest]:
    """`kubectl kustomize DIRECTORY`, parsed."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, f"kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(overlay: str, components: Sequence[str] = (), workdir: Path | None = None) -> list[Manifest]:
    """An overlay as shipped, or with more of deploy/kubernetes/components/ added on top.

    Adding components needs a kustomization of its own (in `workdir`), which names the overlay and
    the components by relative path, as kustomize requires.
    """
    if not components:
        return render_directory(KUBERNETES / "overlays" / overlay)
    assert workdir is not None, "adding components needs a working directory"
    workdir.mkdir(parents=True, exist_ok=True)

    def relative(path: Path) -> str:
        return os.path.relpath(path, workdir)

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(KUBERNETES / "overlays" / overlay)],
        "components": [relative(KUBERNETES / "components" / name) for name in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render_directory(workdir)


def find(manifests: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one object of `kind` (and `name`, needed when there are several)."""
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def kinds(manifests: Sequence[Manifest]) -> Iterator[str]:
    for manifest in manifests:
        yield manifest["kind"]


def container(deployment: Manifest, name: str = "cliplens") -> Manifest:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return dict(found)


def settings(manifests: Sequence[Manifest], deployment: Manifest) -> dict[str, str]:
    """The environment a pod of `deployment` gets from its ConfigMaps (envFrom), by name."""
    environment: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        config_map = find(manifests, "ConfigMap", source["configMapRef"]["name"])
        environment.update(config_map.get("data", {}))
    return environment
