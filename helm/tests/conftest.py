"""Shared helpers of the chart checks: the chart, its value sets, rendering
through Helm's Go SDK (helm-python-sdk), and what the Rust code says each
role is called by."""

from __future__ import annotations

import copy
import json
import pathlib
import re
from typing import Any

import helm_python as helm
import pytest
from helm_python import _native
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "messenger"
RELEASE = "chat"
NAMESPACE = "chat"

# The value sets every check runs over: the defaults, and the production
# shape layered over them (as `helm install -f values-production.yaml` does).
SCENARIOS = {
    "default": {},
    "production": yaml.safe_load((CHART / "values-production.yaml").read_text()),
}


def chart_kube_version() -> str:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion ">=X.Y.Z-0")."""
    declared = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*v?(\d+\.\d+\.\d+)(-0)?", declared)
    assert match, f"kubeVersion {declared!r} is not of the form >=X.Y.Z-0"
    return match.group(1)


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of value layers, later ones winning (maps merge, the rest replaces)."""
    result: dict[str, Any] = {}
    for layer in layers:
        result = _merge(result, layer)
    return result


def _merge(base: Any, layer: Any) -> Any:
    if isinstance(base, dict) and isinstance(layer, dict):
        out = copy.deepcopy(base)
        for key, value in layer.items():
            out[key] = _merge(out.get(key), value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(layer)


class Rendered:
    """The objects one `helm template` produces, by kind and name."""

    def __init__(self, manifests: dict[str, str]):
        self.files = manifests
        self.notes = manifests.get("messenger/templates/NOTES.txt", "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            for document in yaml.safe_load_all(text):
                if document:
                    document["__source"] = path
                    self.objects.append(document)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [obj for obj in self.kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def by_component(self, kind: str) -> dict[str, dict[str, Any]]:
        return {obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj for obj in self.kind(kind)}

    def config_files(self) -> dict[str, str]:
        """Role -> the TOML text the chart rendered for it."""
        config = self.get("ConfigMap", f"{RELEASE}-messenger-config")
        return {key.removesuffix(".toml"): text for key, text in config["data"].items()}

    @staticmethod
    def clean(obj: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in obj.items() if not key.startswith("__")}


def render(values: dict[str, Any] | None = None, kube_version: str | None = None) -> Rendered:
    """`helm template` for the oldest Kubernetes the chart declares, in
    Helm's strict mode (a template reading a key that is not there fails).

    Chart.render of helm-python-sdk 0.2.2 does not pass the library's
    `kube_version` and `strict` options on, so the native call is made here
    with them (same function, same JSON options)."""
    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "strict": True,
               "kube_version": kube_version or f"v{chart_kube_version()}"}
    with helm.Chart.load(str(CHART)) as chart:
        manifests = json.loads(_native.call_string(
            "helm_render", chart._raw(), json.dumps(values) if values else None, json.dumps(options)))
    return Rendered(manifests)


def lint(values: dict[str, Any] | None = None, kube_version: str | None = None) -> dict[str, Any]:
    return helm.lint(str(CHART), values or None, strict=True, namespace=NAMESPACE, kube_version=kube_version)


def lint_problems(report: dict[str, Any]) -> list[str]:
    """Warnings and errors (strict lint fails on both); info such as 'icon is recommended' is not one."""
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems + list(report.get("errors") or [])


def callers_in_code() -> dict[str, set[str]]:
    """Role -> the roles its internal server lets in, read from each
    service's `fn callers()` authorization rules (services/<role>/src/lib.rs)."""
    callers: dict[str, set[str]] = {}
    for lib in sorted((ROOT / "services").glob("*/src/lib.rs")):
        text = lib.read_text()
        body = re.search(r"fn callers\(\) -> authorize::Rules \{(.*?)\n\}", text, re.S)
        assert body, f"{lib}: no `fn callers()` rules found"
        callers[lib.parent.parent.name] = {role.lower() for role in re.findall(r"Role::(\w+)", body.group(1))}
    return callers


@pytest.fixture(scope="session", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(SCENARIOS[request.param])


@pytest.fixture(scope="session")
def default_render() -> Rendered:
    return render()


@pytest.fixture(scope="session")
def production_render() -> Rendered:
    return render(SCENARIOS["production"])
