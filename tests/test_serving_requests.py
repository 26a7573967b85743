"""Request validation and repository export for serving: pure functions, no server."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from motioncharacter.serving.repository import DeployOptions, config_pbtxt, export_repository, resolve_weights
from serving_fixtures import request  # the serving tests' one request getter

from motioncharacter.serving.request_args import Limits, model_defaults, parse

LIMITS = Limits(max_frames=8, max_resolution=128, max_steps=10, max_prompt_chars=20)


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


IMAGE = png(np.full((16, 24, 3), (200, 10, 30), np.uint8))




def test_defaults_and_decoding():
    kw = parse(request(image=IMAGE, prompt="a man", height=64, width=64, frames=8, steps=2), LIMITS)
    assert kw["image"].shape == (16, 24, 3) and tuple(kw["image"][0, 0]) == (200, 10, 30)  # RGB, not BGR
    assert kw["prompt"] == "a man" and kw["negative_prompt"] == "" and kw["action"] == ""
    assert kw["intensity"] == 10.0 and kw["guidance"] == 8.0 and kw["id_scale"] == 1.0 and kw["seed"] == 0
    assert kw["face_index"] is None
    assert parse(request(image=IMAGE, prompt="a", height=64, width=64, frames=8, steps=2, face_index=2),
                 LIMITS)["face_index"] == 2


@pytest.mark.parametrize("values, message", [
    (dict(prompt="a"), "required input 'image' is missing"),
    (dict(image=b"", prompt="a"), "input 'image' is empty"),
    (dict(image=b"not an image", prompt="a"), "not a readable image"),
    (dict(image=IMAGE, prompt="   "), "input 'prompt' is empty"),
    (dict(image=IMAGE, prompt="x" * 21), "input 'prompt' is 21 characters long, over this server's limit of 20"),
    (dict(image=IMAGE, prompt="a", negative_prompt="x" * 21), "input 'negative_prompt' is 21 characters"),
    (dict(image=IMAGE, prompt="a", intensity=math.nan), "'intensity' must be a number in [0, 20], got nan"),
    (dict(image=IMAGE, prompt="a", intensity=20.5), "'intensity' must be a number in [0, 20], got 20.5"),
    (dict(image=IMAGE, prompt="a", intensity=-1.0), "'intensity' must be a number in [0, 20]"),
    (dict(image=IMAGE, prompt="a", guidance=math.inf), "'guidance' must be a finite number >= 0"),
    (dict(image=IMAGE, prompt="a", frames=9, height=64, width=64, steps=2), "'frames' is 9, over this server's limit of 8"),
    (dict(image=IMAGE, prompt="a", frames=0, steps=2), "'frames' must be at least 1"),
    (dict(image=IMAGE, prompt="a", frames=8, height=136, width=64, steps=2), "'height' is 136, over this server's limit of 128"),
    (dict(image=IMAGE, prompt="a", frames=8, height=64, width=60, steps=2), "'width' must be a multiple of 8"),
    (dict(image=IMAGE, prompt="a", steps=11), "'steps' is 11, over this server's limit of 10"),
    (dict(image=IMAGE, prompt="a", frames=8, height=64, width=64, steps=2, seed=-3), "'seed' must be >= 0"),
])
def test_bad_requests_name_the_input(values, message):
    with pytest.raises(ValueError) as e:
        parse(request(**values), LIMITS)
    assert message in str(e.value)


def test_batch_of_two_is_refused():
    get = request(image=IMAGE, prompt="a")
    def two(name):
        v = get(name)
        return None if v is None else np.concatenate([v, v])
    with pytest.raises(ValueError, match="exactly one value"):
        parse(two, LIMITS)


def test_limits_round_trip_through_parameters():
    assert Limits.from_parameters(LIMITS.as_parameters()) == LIMITS
    assert Limits.from_parameters({}) == Limits()


def test_config_pbtxt_kinds_policies_and_stream():
    gpu = config_pbtxt("m", DeployOptions(preset="tiny", kind="gpu", instances=2, version_policy="specific:1,3"),
                       {"weights": "w"}, decoupled=True)
    assert "instance_group [ { kind: KIND_GPU count: 2 } ]" in gpu
    assert "version_policy: { specific: { versions: [ 1, 3 ] } }" in gpu
    assert "model_transaction_policy { decoupled: true }" in gpu
    assert '{ name: "step" data_type: TYPE_INT32 dims: [ 1 ] }' in gpu
    cpu = config_pbtxt("m", DeployOptions(preset="tiny", max_batch_size=4, queue_timeout_s=2.5, max_queue_size=3),
                       {}, decoupled=False)
    assert "KIND_CPU" in cpu and "max_batch_size: 4" in cpu and "decoupled" not in cpu
    assert "default_timeout_microseconds: 2500000" in cpu and "max_queue_size: 3" in cpu
    assert '{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }' in cpu        # required
    assert '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }' in cpu
    assert "version_policy: { latest: { num_versions: 1 } }" in cpu


@pytest.mark.parametrize("opts, message", [
    (dict(), "exactly one of --weights"),
    (dict(preset="tiny", weights="w"), "exactly one of --weights"),
    (dict(preset="tiny", version_policy="newest"), "version policy 'newest'"),
    (dict(preset="tiny", instances=0), "--instances must be >= 1"),
    (dict(preset="tiny", kind="tpu"), "--kind must be cpu or gpu"),
])
def test_deploy_options_are_checked(opts, message):
    with pytest.raises(ValueError, match=message):
        DeployOptions(**opts).check()


def weights_configs(folder):
    """Just the config files deploy reads (native size: 8 x 2**3 = 64 px)."""
    for part, cfg in (("unet", '{"sample_size": 8}'), ("vae", '{"block_out_channels": [8, 8, 8, 8]}')):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(cfg)
    return folder


def test_export_copies_weights_and_references_them_relatively(tmp_path):
    weights = weights_configs(tmp_path / "weights")
    repo = tmp_path / "repo"
    export_repository(str(repo), DeployOptions(weights=str(weights), copy_weights=True, version=3))
    for model in ("motioncharacter", "motioncharacter_stream"):
        assert (repo / model / "3" / "model.py").read_text().strip().endswith("import TritonPythonModel  # noqa: F401")
        cfg = (repo / model / "config.pbtxt").read_text()
        assert 'key: "weights" value: { string_value: "motioncharacter/3/weights" }' in cfg  # each version its own
    assert (repo / "motioncharacter" / "3" / "weights" / "unet" / "config.json").read_text() == '{"sample_size": 8}'
    assert 'key: "default_height" value: { string_value: "64" }' in cfg
    assert resolve_weights("motioncharacter/3/weights", repo) == str(repo / "motioncharacter" / "3" / "weights")
    assert resolve_weights("s3://b/w", repo) == "s3://b/w" and resolve_weights("", repo) is None


def test_export_references_weights_by_absolute_uri(tmp_path):
    weights_configs(tmp_path / "w")
    export_repository(str(tmp_path / "repo"), DeployOptions(weights=str(tmp_path / "w")))
    cfg = (tmp_path / "repo" / "motioncharacter" / "config.pbtxt").read_text()
    assert f'string_value: "{tmp_path / "w"}"' in cfg
    assert not (tmp_path / "repo" / "motioncharacter" / "weights").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_repository(str(tmp_path / "r2"), DeployOptions(weights=str(tmp_path / "missing")))


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_unreachable_server_is_retried_then_reported(scheme):
    from motioncharacter.cli import UserError
    from motioncharacter.serving.client import MotionCharacterClient, ServerUnavailable
    from motioncharacter.serving.server import free_port

    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    with MotionCharacterClient(url, timeout_s=5, retries=2, backoff_s=0.01) as c:
        assert not c.ready()
        with pytest.raises(ServerUnavailable, match="unavailable after 3 tries") as e:
            c.generate(IMAGE, "a man", steps=2)
    assert isinstance(e.value, UserError)  # the CLI prints it without a traceback


def test_client_refuses_unknown_arguments_and_bad_urls():
    from motioncharacter.serving.client import MotionCharacterClient, parse_url

    assert parse_url("grpc://h:8001") == ("grpc", "h:8001") and parse_url("h:8000/") == ("http", "h:8000")
    with pytest.raises(ValueError, match="use http://HOST:PORT or grpc://HOST:PORT"):
        MotionCharacterClient("ftp://h:1")
    with pytest.raises(ValueError, match="streaming needs gRPC"):
        next(MotionCharacterClient("http://127.0.0.1:1").stream(IMAGE, "a"))
    with pytest.raises(ValueError, match="unknown generation argument.*: stepz"):
        MotionCharacterClient("http://127.0.0.1:1").generate(IMAGE, "a", stepz=3)


def test_absent_sizes_take_the_served_models_defaults():
    served = {"frames": 8, "height": 64, "width": 64, "steps": 4}
    kw = parse(request(image=IMAGE, prompt="a man"), LIMITS, served)
    assert {k: kw[k] for k in served} == served
    # what the client sends wins; without server defaults, generate()'s own
    assert parse(request(image=IMAGE, prompt="a", frames=2, height=32, width=32, steps=1), LIMITS,
                 served)["frames"] == 2
    assert model_defaults({"default_frames": "8", "default_height": "64", "fps": "8"}) == {"frames": 8, "height": 64}


def test_deploy_records_native_sizes_from_config_files(tmp_path):
    """A weights folder's sizes come from unet/vae configs and motioncharacter.json, loading no model."""
    import json

    from motioncharacter.model.inference import weights_defaults

    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert weights_defaults(str(tmp_path)) == {"frames": 16, "height": 512, "width": 512, "steps": 30}  # SD1.5: the paper's 30 steps
    (tmp_path / "motioncharacter.json").write_text(json.dumps({"defaults": {"frames": 8, "steps": 30}}))
    assert weights_defaults(str(tmp_path)) == {"frames": 8, "height": 512, "width": 512, "steps": 30}
    assert weights_defaults(preset="tiny") == {"frames": 8, "height": 64, "width": 64, "steps": 4}
    with pytest.raises(FileNotFoundError, match="native size"):
        weights_defaults(str(tmp_path / "unet"))
