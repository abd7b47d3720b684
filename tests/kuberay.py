"""Offline validation of KubeRay manifests against the CRDs' openAPIV3Schema (copied in tests/data/kuberay-crds).

OpenAPI -> JSON Schema as KubeRay's own CI does it (kubeconform): x-kubernetes-* keys dropped, int-or-string is
an integer or a string, int32/int64 bounded. Strict: objects with known properties reject unknown ones, so a
misspelt field fails here although the API server would silently drop it.
"""

import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).parent / "data" / "kuberay-crds"
FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _convert(node):
    if isinstance(node, list):
        return [_convert(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "example"):
            continue
        if key == "properties":
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _convert(value) if isinstance(value, (dict, list)) else value
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("format") in INT_RANGES and out.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_RANGES[node["format"]]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _validator(kind: str, version: str) -> jsonschema.Draft202012Validator:
    crd = yaml.load((CRDS / FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = {v["name"]: v for v in crd["spec"]["versions"]}[version]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(_convert(schema))


def validate(manifest: dict) -> list[str]:
    """Readable errors ('path: message'), empty when the manifest is valid."""
    group, _, version = manifest.get("apiVersion", "").partition("/")
    if manifest.get("kind") not in FILES or group != "ray.io":
        return [f"not a KubeRay manifest: {manifest.get('apiVersion')} {manifest.get('kind')}"]
    errors = _validator(manifest["kind"], version).iter_errors(manifest)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
