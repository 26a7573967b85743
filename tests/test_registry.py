"""The MLflow Model Registry as the system of record, against the session's real MLflow server:
training registers versions with their lineage, evaluation links to the version it scored, the
gate's aliases and the champion rule, promote, and models:/ references in deploy / evaluate / compare."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
import yaml
from train_fixtures import prepared, run_train, train_cmd, train_env

pytestmark = [pytest.mark.services, pytest.mark.slow]

NAME = f"registry-test-{uuid.uuid4().hex[:8]}"  # this module's own model on the shared session server
METRIC = "motion_smoothness_flowinterp"
ADAPTER_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def trained(stack_services, tmp_path_factory):
    """Two one-step trainings registered as NAME/1 (s3:// output) and NAME/2 (local output)."""
    prep = prepared(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("registry")
    env = train_env(tmp) | stack_services.env()
    outs = [f"s3://{stack_services.bucket}/registry-test/{NAME}/run1", str(tmp / "run2")]
    for out in outs:
        rc, log = run_train(train_cmd(prep / "manifest.jsonl", out, 1, "--registered-model", NAME,
                                      "--set", "experiment=registry-test"), env)
        assert rc == 0, log[-3000:]
        assert f"as models:/{NAME}/" in log
    return {"manifest": prep / "manifest.jsonl", "outs": outs}


def test_training_registers_versions_with_lineage(trained, stack):
    from mlflow.tracking import MlflowClient

    from motioncharacter import registry, storage
    from motioncharacter.components.train.trainer import git_commit

    v1, v2 = (registry.resolve(f"models:/{NAME}/{n}") for n in (1, 2))
    s3_out, local_out = trained["outs"]
    assert v1.source == f"{s3_out}/adapter"
    # a tracking server refuses local paths: the adapter went into the training run's artifacts
    assert v2.source.startswith("mlflow-artifacts:") and v2.source.endswith("/adapter")
    sha = hashlib.sha256(trained["manifest"].read_bytes()).hexdigest()
    client = MlflowClient(stack.mlflow_uri)
    for v in (v1, v2):
        t = v.tags
        assert t[registry.MANIFEST_TAG] == sha and t[registry.BASE_TAG] == "preset:tiny"
        assert t[registry.COMMIT_TAG] == git_commit() and t["ablation"] == "full"
        run = client.get_run(t[registry.RUN_TAG])
        assert run.info.run_id == v.run_id and run.data.params["data.manifest_sha256"] == sha
    assert v1.tags[registry.RUN_TAG] != v2.tags[registry.RUN_TAG]
    # the registry's copy is the adapter training wrote, and the output knows its version
    assert (registry.adapter_dir(v2) / ADAPTER_FILE).read_bytes() == (Path(local_out) / "adapter" / ADAPTER_FILE).read_bytes()
    assert registry.registered_version_of(local_out)["uri"] == f"models:/{NAME}/2"
    assert storage.exists(f"{s3_out}/adapter/{registry.MARKER}")


def test_registering_the_same_run_again_adds_no_version(trained, stack):
    from motioncharacter import registry
    from motioncharacter.components.train.cli import register
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load

    cfg = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "model.weights="])
    assert register(cfg, str(trained["manifest"]), trained["outs"][0], NAME).version == 1  # a retried step
    assert [v.version for v in registry.versions(NAME)] == [2, 1]


def test_a_failed_registration_is_a_clear_error(trained, stack, monkeypatch):
    from motioncharacter import registry
    from motioncharacter.components.train.cli import register
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load
    from motioncharacter.stack import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setattr(registry, "BACKOFF", 0.0)
    cfg = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "model.weights="])
    out = trained["outs"][0]
    with pytest.raises(registry.RegistryError, match="could not be registered") as e:
        register(cfg, str(trained["manifest"]), out, NAME)
    assert f"{out}/adapter" in str(e.value) and "unreachable" in str(e.value) and "--resume" in str(e.value)


def test_evaluate_links_the_version_and_compare_takes_references(trained, stack, tmp_path, capsys):
    import cv2
    from mlflow.tracking import MlflowClient

    from motioncharacter import registry
    from motioncharacter.cli import main
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.components.evaluate.stage import evaluate
    from motioncharacter.config import load
    from motioncharacter.fixtures import package_face

    faces = tmp_path / "faces"
    faces.mkdir()
    cv2.imwrite(str(faces / "gh.png"), cv2.cvtColor(cv2.resize(package_face("grace_hopper"), (128, 128)),
                                                    cv2.COLOR_RGB2BGR))
    cfg = load(EvalConfig, "evaluate.yaml", overrides=["generation.frames=4", "generation.steps=1",
                                                       "generation.guidance=1.0", "output.gifs=0",
                                                       "experiment=registry-test-eval"])
    s = evaluate(str(faces), str(tmp_path / "eval"), cfg, weights=f"models:/{NAME}/2", limit=1, progress=False)
    assert s["registered_model"]["uri"] == f"models:/{NAME}/2"
    v2 = registry.resolve(f"models:/{NAME}/2")
    assert v2.tags[registry.EVAL_RUN_TAG] == s["mlflow_run_id"]
    measured = {k: m["value"] for k, m in s["metrics"].items() if m.get("value") is not None}
    assert measured and all(float(v2.tags[f"eval.{k}"]) == pytest.approx(x, rel=1e-5) for k, x in measured.items())
    assert MlflowClient(stack.mlflow_uri).get_run(s["mlflow_run_id"]).data.tags["registered_model"] == v2.uri

    assert main(["compare", f"models:/{NAME}/2", s["mlflow_run_id"], "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert f"| models:/{NAME}/2 |" in out
    csv = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in csv[1:]] == [s["mlflow_run_id"]] * 2  # both name the same run
    # a version no evaluation has linked (tests run in random order: another may have evaluated version 1)
    fresh = [v.version for v in registry.versions(NAME) if not v.tags.get(registry.EVAL_RUN_TAG)]
    assert fresh, f"every version of {NAME} is evaluated; the module registers one that is not"
    assert main(["compare", f"models:/{NAME}/{fresh[0]}"]) == 1  # not evaluated yet: said so
    assert f"models:/{NAME}/{fresh[0]}" in capsys.readouterr().err


def _link(registry, version: int, value: float) -> None:
    """An evaluation of ``version`` that measured ``value`` (a real run on the server)."""
    import mlflow

    mlflow.set_experiment("registry-test-eval")
    with mlflow.start_run() as run:
        mlflow.log_metric(METRIC, value)
    registry.link_evaluation(NAME, version, run.info.run_id, {METRIC: {"value": value}})


def test_gate_sets_challenger_and_the_rule_decides_champion(trained, stack):
    from motioncharacter import registry
    from motioncharacter.pipelines.steps import gate_aliases

    thresholds = {METRIC: 0.5}
    _link(registry, 1, 0.9)
    _link(registry, 2, 0.7)
    summary = {n: {"registered_model": {"name": NAME, "version": n, "uri": f"models:/{NAME}/{n}"}} for n in (1, 2)}

    def aliases():
        return {v.version: sorted(v.aliases) for v in registry.versions(NAME)}

    client = registry.client()
    for a in list(client.get_registered_model(NAME).aliases):  # start from none, whatever ran before
        client.delete_registered_model_alias(NAME, a)
    assert "aliases unchanged" in gate_aliases(summary[2], False, thresholds, "auto")
    assert aliases() == {1: [], 2: []}
    gate_aliases(summary[2], True, thresholds, "auto")  # no champion yet: it wins
    assert aliases() == {1: [], 2: ["challenger", "champion"]}
    said = gate_aliases(summary[1], True, thresholds, "auto")  # 0.9 beats 0.7
    assert aliases() == {1: ["challenger", "champion"], 2: []} and "beats version 2" in said
    gate_aliases(summary[2], True, thresholds, "manual")  # manual: challenger only
    assert aliases() == {1: ["champion"], 2: ["challenger"]}
    gate_aliases(summary[2], True, thresholds, "auto")  # 0.7 does not beat 0.9
    assert aliases() == {1: ["champion"], 2: ["challenger"]}
    gate_aliases(summary[2], True, thresholds, f"{METRIC}:lower")  # lower is better: 0.7 wins
    assert aliases() == {1: [], 2: ["challenger", "champion"]}
    assert "no alias set" in gate_aliases({"metrics": {}}, True, thresholds, "auto")


def test_champion_rule_parsing_and_comparison():
    from motioncharacter.registry import ChampionRule

    assert ChampionRule.parse("auto", {"a": 0.5, "b": 1}) == ChampionRule("a")
    assert ChampionRule.parse("auto", {"fvd": {"max": 300}}) == ChampionRule("fvd", lower=True)
    assert ChampionRule.parse("manual") == ChampionRule.parse("") == ChampionRule()
    assert ChampionRule.parse("x:lower") == ChampionRule("x", lower=True)
    with pytest.raises(ValueError, match="sideways"):
        ChampionRule.parse("x:sideways")
    r = ChampionRule("x")
    assert r.beats(0.6, 0.5) and not r.beats(0.5, 0.5) and not r.beats(0.4, 0.5)
    assert r.beats(0.1, None) and not r.beats(None, 0.1)
    assert ChampionRule("x", lower=True).beats(0.4, 0.5)


def test_promote_resolve_and_deploy_a_reference(trained, stack, tmp_path, capsys):
    from motioncharacter import registry
    from motioncharacter.cli import main

    assert main(["registry", "promote", NAME, "1"]) == 0
    assert f"models:/{NAME}@champion -> version 1" in capsys.readouterr().out
    v1 = registry.resolve(f"models:/{NAME}/1")
    assert registry.resolve(f"models:/{NAME}@champion").source == v1.source
    assert main(["registry", "promote", NAME, "@champion", "--alias", "staging"]) == 0
    assert registry.resolve(f"models:/{NAME}@staging").version == 1
    assert registry.resolve(f"models:/{NAME}/latest").version == 2
    assert main(["registry", "list", NAME]) == 0
    listing = capsys.readouterr().out
    assert "@champion" in listing and "@staging" in listing and v1.source in listing

    repo = tmp_path / "repo"
    assert main(["deploy", "--model", f"models:/{NAME}@champion", "--model-repository", str(repo)]) == 0
    assert f"is models:/{NAME}/1" in capsys.readouterr().out
    served = list(repo.rglob(f"adapter/{ADAPTER_FILE}"))  # assembled here (tiny base + adapter), so copied
    assert served and all(p.read_bytes() == (registry.adapter_dir(v1) / ADAPTER_FILE).read_bytes() for p in served)
    config = (repo / "motioncharacter" / "config.pbtxt").read_text()
    assert 'key: "weights"' in config and 'key: "preset" value: { string_value: "" }' in config

    # KServe: the alias decides which version's repository the InferenceService serves
    manifest = tmp_path / "isvc.yaml"
    assert main(["deploy", "--target", "kserve", "--model", f"models:/{NAME}@staging", "--model-repository",
                 str(repo), "--manifest", str(manifest), "--canary-percent", "20"]) == 0
    model = yaml.safe_load(manifest.read_text())["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"{repo}-kserve/v1"  # @staging is version 1
    assert list((tmp_path / "repo-kserve" / "v1").rglob(f"adapter/{ADAPTER_FILE}"))


def test_unknown_alias_is_a_clear_error(trained, stack, tmp_path, capsys):
    from motioncharacter.cli import main

    assert main(["registry", "show", f"models:/{NAME}@nonesuch"]) == 1
    err = capsys.readouterr().err
    assert f"registered model '{NAME}' has no alias 'nonesuch' (its aliases: " in err
    assert main(["deploy", "--model", f"models:/{NAME}@nonesuch", "--model-repository", str(tmp_path / "r")]) == 1
    assert "no alias 'nonesuch'" in capsys.readouterr().err
    assert main(["registry", "show", "models:/no-such-model-here/1"]) == 1
    assert "no registered model 'no-such-model-here'" in capsys.readouterr().err
    assert main(["registry", "show", "models:/x/y/z"]) == 1
    assert "not a registry reference" in capsys.readouterr().err


def test_champion_deploys_to_a_running_triton_and_rolls_back(trained, stack, triton, monkeypatch, capsys):
    """Registry to Triton: each champion in turn is deployed by reference to the session's running
    server, which then serves exactly that version's adapter; a rollback serves the earlier champion."""
    from motioncharacter import registry
    from motioncharacter.cli import main
    from motioncharacter.serving.client import MotionCharacterClient
    from motioncharacter.serving.repository import MODEL, served_version
    from motioncharacter.serving.server import ADMIN_KEY_ENV
    from serving_fixtures import PROMPT, face_image, repository_restored

    repo, url = triton.repository, triton.http_url
    monkeypatch.setenv(ADMIN_KEY_ENV, triton.admin_key)
    small = dict(steps=1, frames=2, height=64, width=64, seed=3)
    with repository_restored(triton), MotionCharacterClient(url, timeout_s=300) as c:
        original, deployed = served_version(repo), {}
        for n in (1, 2):
            assert main(["registry", "promote", NAME, str(n)]) == 0
            assert main(["deploy", "--model", f"models:/{NAME}@champion", "--model-repository", repo,
                         "--url", url]) == 0
            assert f"is models:/{NAME}/{n}" in capsys.readouterr().out
            deployed[n] = served_version(repo)
            c.check_version(deployed[n])  # loaded, ready, and the only version served
            want = (registry.adapter_dir(registry.resolve(f"models:/{NAME}/{n}")) / ADAPTER_FILE).read_bytes()
            files = list((Path(repo) / MODEL / str(deployed[n])).rglob(f"adapter/{ADAPTER_FILE}"))
            assert files and all(f.read_bytes() == want for f in files), f"version {deployed[n]}: not {NAME}/{n}"
            assert c.generate(face_image(), PROMPT, **small).frames.shape == (2, 64, 64, 3)
        assert deployed[2] == deployed[1] + 1 and deployed[1] == original + 1
        assert main(["deploy", "--rollback", "--model-repository", repo, "--url", url]) == 0
        c.check_version(deployed[1])  # the earlier champion again
        assert main(["deploy", "--rollback", "--model-repository", repo, "--url", url, "--version",
                     str(original)]) == 0
        c.check_version(original)  # and the session's own version, as the other tests expect
