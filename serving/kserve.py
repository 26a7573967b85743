"""KServe ``InferenceService`` manifests for the Triton model repository (``deploy --target kserve``).

The predictor runs KServe's stock ``kserve-tritonserver`` ClusterServingRuntime on the project's
Triton image (docker/Dockerfile.triton: the Python 3.11 backend stub the exported models need, which
is why no ServingRuntime of our own is needed). Its ``storageUri`` is one immutable model repository
per registered model version (``<model-repository>-kserve/v<N>``: a sibling, so a Triton Deployment
polling ``<model-repository>`` never sees these folders as models), so each KServe revision serves
exactly one registry version and a previous revision stays what it was.

Rollouts are KServe's canary: a new version comes up as the canary with ``canaryTrafficPercent`` of
the traffic while the last rolled-out revision keeps the rest; ``promote`` gives the canary all of
it; ``rollback`` sets the canary's share to 0, which sends all traffic back to the previous revision
(KServe keeps it as ``status.components.predictor.previousRolledoutRevision``).

Every Triton container runs with the admin APIs restricted (model repository, shared memory,
trace, logging; HTTP and gRPC) behind a key from the Secret ``triton-admin``, and with the request
size Triton itself accepts pinned (``TRITON_HARDENING``).
"""
from __future__ import annotations

import copy

from .server import ADMIN_HEADER, ADMIN_KEY_ENV as ADMIN_KEY, RESTRICTED_APIS

API_VERSION, KIND = "serving.kserve.io/v1beta1", "InferenceService"
RUNTIME = "kserve-tritonserver"  # KServe's stock ClusterServingRuntime for Triton
TRITON_IMAGE = "ghcr.io/motioncharacter/motioncharacter-triton:0.1.0"
ADMIN_SECRET = "triton-admin"  # k8s/secrets/triton-admin.yaml: the key clients send (deploy --url) too
# Triton rejects larger HTTP bodies before the backend sees them (the backend's own cap is 64 MB of
# inputs, serving/request_args.py; 64 MiB leaves room for the request's JSON header)
HTTP_MAX_INPUT_BYTES = 64 * 1024 * 1024
_RESTRICTED = f"{RESTRICTED_APIS}:{ADMIN_HEADER}=$({ADMIN_KEY})"  # $(VAR): expanded by the kubelet
TRITON_HARDENING = [f"--http-restricted-api={_RESTRICTED}", f"--grpc-restricted-protocol={_RESTRICTED}",
                    f"--http-max-input-size={HTTP_MAX_INPUT_BYTES}"]
ADMIN_KEY_ENV = {"name": ADMIN_KEY, "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": ADMIN_KEY}}}


def storage_uri(model_repository: str, version: int) -> str:
    """The repository KServe serves for registered version ``version``: one per version, never rewritten."""
    return f"{kserve_root(model_repository)}/v{int(version)}"


def kserve_root(model_repository: str) -> str:
    """Where the per-version repositories of ``model_repository`` go (beside it, not in it)."""
    return f"{model_repository.rstrip('/')}-kserve"


def inference_service(name: str, namespace: str, storage: str, *, image: str = TRITON_IMAGE,
                      canary_percent: int | None = None, service_account: str = "triton-kserve",
                      gpus: int = 0, model: str = "") -> dict:
    """The InferenceService serving ``storage``; with ``canary_percent`` it is rolled out as a canary
    taking that share of the traffic (the previous revision keeps the rest)."""
    if canary_percent is not None and not 0 <= canary_percent <= 100:
        raise ValueError(f"canary percent {canary_percent}: must be 0..100")
    limits = {"memory": "64Gi" if gpus else "16Gi", **({"nvidia.com/gpu": gpus} if gpus else {})}
    requests = {"cpu": "4" if gpus else "1", "memory": "32Gi" if gpus else "4Gi",
                **({"nvidia.com/gpu": gpus} if gpus else {})}
    predictor = {
        # the account KServe's storage initializer reads storageUri as: annotated with a read-only object-store
        # user's Secret (KServe's S3 setup; k8s/README.md)
        "serviceAccountName": service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},  # the image's triton-server user
        **({"canaryTrafficPercent": canary_percent} if canary_percent is not None else {}),
        "model": {
            "modelFormat": {"name": "triton"},
            "runtime": RUNTIME,
            "storageUri": storage,
            "image": image,
            # the stock runtime's args begin with `tritonserver`: run them through the NGC entrypoint
            # (the project image's ENTRYPOINT is tritonserver itself); KServe appends these args to them
            "command": ["/opt/nvidia/nvidia_entrypoint.sh"],
            "args": [*TRITON_HARDENING, "--strict-readiness=true", "--exit-on-error=true", "--log-verbose=0"],
            "env": [ADMIN_KEY_ENV, {"name": "HOME", "value": "/tmp"}],
            "resources": {"requests": requests, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "runAsUser": 1000, "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        },
        # the Python backend passes tensors through /dev/shm (64 MiB by default is too small)
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi" if gpus else "1Gi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}],
    }
    if gpus:
        predictor["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        predictor["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "motioncharacter"},
                     "annotations": {"motioncharacter.io/model": model} if model else {}},
        "spec": {"predictor": predictor},
    }


def _checked(manifest: dict) -> dict:
    if (manifest.get("apiVersion"), manifest.get("kind")) != (API_VERSION, KIND):
        raise ValueError(f"not an InferenceService ({manifest.get('apiVersion')}/{manifest.get('kind')})")
    return copy.deepcopy(manifest)


def promote(manifest: dict) -> dict:
    """The canary becomes the default: all traffic to the newest revision."""
    m = _checked(manifest)
    if "canaryTrafficPercent" not in m["spec"]["predictor"]:
        raise ValueError(f"InferenceService {m['metadata']['name']} has no canary to promote")
    del m["spec"]["predictor"]["canaryTrafficPercent"]
    return m


def rollback(manifest: dict) -> dict:
    """All traffic back to the previous rolled-out revision; the newest stays up with none."""
    m = _checked(manifest)
    m["spec"]["predictor"]["canaryTrafficPercent"] = 0
    return m
