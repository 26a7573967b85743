"""KServe serving (`deploy --target kserve`, serving/kserve.py): the InferenceService validates against
KServe's published CRD (k8s/crds, v0.18.0), and a canary -> promote -> rollback sequence writes the
manifests KServe needs for each step, each on its own immutable model repository per version."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from motioncharacter.cli import main
from motioncharacter.serving import kserve
from motioncharacter.serving.repository import served_version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)

TINY = ["--preset", "tiny", "--no-warmup"]


@pytest.mark.parametrize("gpus, canary", [(0, None), (1, 10), (1, 0)])
def test_inference_service_validates_against_kserves_crd(gpus, canary):
    isvc = kserve.inference_service("motioncharacter", "motioncharacter", "s3://models/m-kserve/v3", gpus=gpus,
                                    canary_percent=canary, model="models:/motioncharacter@challenger")
    assert kv.check_custom(isvc) == []
    p = isvc["spec"]["predictor"]
    assert p.get("canaryTrafficPercent") == canary
    m = p["model"]
    assert m["modelFormat"] == {"name": "triton"} and m["runtime"] == "kserve-tritonserver"  # the stock runtime
    assert m["storageUri"] == "s3://models/m-kserve/v3" and m["image"] == kserve.TRITON_IMAGE
    assert (m["resources"]["limits"].get("nvidia.com/gpu"), "tolerations" in p) == ((1, True) if gpus else (None, False))
    assert p["securityContext"]["runAsNonRoot"] and m["securityContext"]["readOnlyRootFilesystem"]
    assert m["securityContext"]["capabilities"] == {"drop": ["ALL"]} and not m["securityContext"]["allowPrivilegeEscalation"]
    # the CRD is not a no-op here either
    bad = kserve.inference_service("m", "ns", "s3://x", canary_percent=10)
    bad["spec"]["predictor"]["canaryTrafficPercent"] = "10"
    bad["spec"]["predictor"]["model"]["storageUrl"] = "s3://x"
    problems = kv.check_custom(bad)
    assert any("canaryTrafficPercent" in x for x in problems) and any("storageUrl" in x for x in problems)
    with pytest.raises(ValueError, match="canary percent 120: must be 0..100"):
        kserve.inference_service("m", "ns", "s3://x", canary_percent=120)


def _isvc(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert kv.check_custom(doc) == [], doc
    return doc


def test_canary_promote_rollback_sequence(tmp_path, capsys):
    """v1 rolled out with all traffic; v2 as a 10% canary; promoted to all traffic; rolled back (all
    traffic to the previous revision, v1). Every step's manifest validates against KServe's CRD."""
    repo, manifest = tmp_path / "models", tmp_path / "isvc.yaml"
    common = ["--target", "kserve", "--model-repository", str(repo), "--manifest", str(manifest)]

    assert main(["deploy", *TINY, "--version", "1", *common]) == 0
    v1 = _isvc(manifest)
    assert v1["spec"]["predictor"]["model"]["storageUri"] == kserve.storage_uri(str(repo), 1) == f"{repo}-kserve/v1"
    assert "canaryTrafficPercent" not in v1["spec"]["predictor"]
    assert served_version(f"{repo}-kserve/v1") == 1  # a full Triton repository, one per version

    assert main(["deploy", *TINY, "--version", "2", "--canary-percent", "10", *common]) == 0
    canary = _isvc(manifest)
    assert canary["spec"]["predictor"]["model"]["storageUri"] == f"{repo}-kserve/v2"
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert "as a canary with 10% of the traffic" in capsys.readouterr().out
    assert served_version(f"{repo}-kserve/v1") == 1  # the previous revision's repository is untouched

    assert main(["deploy", "--target", "kserve", "--promote", "--model-repository", str(repo),
                 "--manifest", str(manifest)]) == 0
    promoted = _isvc(manifest)
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    assert promoted["spec"]["predictor"]["model"] == canary["spec"]["predictor"]["model"]

    assert main(["deploy", "--target", "kserve", "--rollback", "--model-repository", str(repo),
                 "--manifest", str(manifest)]) == 0
    rolled_back = _isvc(manifest)
    assert rolled_back["spec"]["predictor"]["canaryTrafficPercent"] == 0  # KServe: all to the previous revision
    assert "all traffic back to the previous revision" in capsys.readouterr().out

    # deploying a version again reuses its repository (a revision may still serve it)
    before = sorted(p.name for p in (tmp_path / "models-kserve" / "v2").rglob("*"))
    assert main(["deploy", *TINY, "--version", "2", "--canary-percent", "50", *common]) == 0
    assert "already holds version 2: reusing it" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "models-kserve" / "v2").rglob("*")) == before


def test_kserve_deploy_errors_name_the_problem(tmp_path, capsys):
    repo, manifest = str(tmp_path / "models"), str(tmp_path / "isvc.yaml")
    common = ["--target", "kserve", "--model-repository", repo, "--manifest", manifest]
    assert main(["deploy", "--promote", *common]) == 1
    assert "no InferenceService to promote" in capsys.readouterr().err
    assert main(["deploy", *TINY, *common]) == 1  # which version is it?
    assert "give --model models:/NAME@ALIAS, or --version N with --weights/--preset" in capsys.readouterr().err
    assert main(["deploy", *TINY, "--version", "1", *common]) == 0
    capsys.readouterr()
    assert main(["deploy", "--promote", *common]) == 1  # a full rollout has no canary
    assert "has no canary to promote" in capsys.readouterr().err
    assert main(["deploy", "--promote", "--rollback", *common]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["deploy", "--promote", "--model-repository", repo]) == 1
    assert "--promote moves a KServe canary: use it with --target kserve" in capsys.readouterr().err


def test_pipeline_parameters_reach_the_deploy_step(tmp_path):
    from motioncharacter.pipelines.run import compile_pipeline
    from motioncharacter.pipelines.steps import deploy_step

    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path / "p.yaml")))))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["serving_target"]["defaultValue"] == "triton" and params["kserve_canary_percent"]["defaultValue"] == 10
    gate = spec["root"]["dag"]["tasks"]["condition-2"]
    gate_dag = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    inputs = gate_dag["deploy"]["inputs"]["parameters"]
    assert inputs["serving_target"]["componentInputParameter"].endswith("serving_target")
    assert inputs["canary_percent"]["componentInputParameter"].endswith("kserve_canary_percent")
    with pytest.raises(ValueError, match="serving_target=kserve serves registered versions .* no registered adapter"):
        deploy_step(str(tmp_path / "weights"), str(tmp_path / "repo"), target="kserve")
    with pytest.raises(ValueError, match="serving_target='kserv': must be triton"):
        deploy_step(str(tmp_path / "weights"), str(tmp_path / "repo"), target="kserv")
