"""Pickled DeepSpeed state is trusted only from the run's own checkpoints/ folder, and is
unpickled with weights_only=True and an allow-list: a tampered ``latest``, a symlink or key
leading out, or a foreign object inside a shard is refused; a normal checkpoint resumes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import train_env

from motioncharacter import storage
from motioncharacter.components.train import checkpoint as ck


def _checkpoint(out: Path, step_tag: str = "step-00000002") -> Path:
    folder = out / "checkpoints" / step_tag
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (out / "checkpoints" / "latest").write_text(step_tag + "\n")
    return folder


@pytest.mark.parametrize("pointer", ["../../other-run/checkpoints/step-00000002", "/tmp/elsewhere",
                                     "s3://attacker/checkpoints/step-00000002", "step-2"])
def test_latest_naming_anything_but_a_tag_of_this_run_is_refused(tmp_path, pointer):
    _checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(ck.UntrustedCheckpoint, match="not a checkpoint tag of this run") as e:
        ck.latest(str(tmp_path))
    assert repr(pointer) in str(e.value) and str(tmp_path / "checkpoints") in str(e.value)
    with pytest.raises(ck.UntrustedCheckpoint):
        ck.state(str(tmp_path), pointer)
    with pytest.raises(ck.UntrustedCheckpoint):
        ck.fetch(str(tmp_path), pointer)


def test_a_checkpoint_of_this_run_is_found(tmp_path):
    _checkpoint(tmp_path)
    assert ck.latest(str(tmp_path)) == "step-00000002"
    assert ck.state(str(tmp_path), "step-00000002")["world_size"] == 1
    assert ck.fetch(str(tmp_path), "step-00000002") == tmp_path / "checkpoints"


def test_symlinks_out_of_the_checkpoint_folder_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "step-00000002").mkdir(parents=True)
    (elsewhere / "step-00000002" / "state.json").write_text("{}")
    (elsewhere / "evil.pt").write_bytes(b"not ours")

    linked_folder = tmp_path / "a"
    (linked_folder / "checkpoints").mkdir(parents=True)
    (linked_folder / "checkpoints" / "step-00000002").symlink_to(elsewhere / "step-00000002")
    with pytest.raises(ck.UntrustedCheckpoint, match="leads outside its folder"):
        ck.fetch(str(linked_folder), "step-00000002")

    linked_file = tmp_path / "b"
    folder = _checkpoint(linked_file)
    (folder / "mp_rank_00_model_states.pt").symlink_to(elsewhere / "evil.pt")
    with pytest.raises(ck.UntrustedCheckpoint, match="mp_rank_00_model_states.pt"):
        ck.fetch(str(linked_file), "step-00000002")


def test_an_s3_checkpoint_downloads_into_its_own_staging_folder(s3_only_stack, monkeypatch, tmp_path):
    for k, v in s3_only_stack.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # staging_dir is under tempfile.gettempdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    out = "s3://models/trust-test/run"
    src = _checkpoint(tmp_path / "src")
    (src / "global_step2").mkdir()
    (src / "global_step2" / "shard.pt").write_bytes(b"x" * 10)
    storage.upload_dir(src, storage.join(ck.root(out), "step-00000002"))
    storage.write_bytes(storage.join(ck.root(out), "latest"), b"step-00000002\n")

    local_root = ck.fetch(out, ck.latest(out))
    assert local_root.is_relative_to(tmp_path)
    assert (local_root / "step-00000002" / "global_step2" / "shard.pt").read_bytes() == b"x" * 10
    assert json.loads((local_root / "step-00000002" / "state.json").read_text())["step"] == 2


# ---- real DeepSpeed checkpoints, in a subprocess (init_distributed is process-wide) ----------------

DEEPSPEED_ROUNDTRIP = r"""
import json, sys, torch, deepspeed
from pathlib import Path
from motioncharacter.components.train import checkpoint as ck

out, mode = Path(sys.argv[1]), sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
x = torch.linspace(-1, 1, 4).reshape(1, 4)

def engine(seed, stage):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}, "bf16": {"enabled": False}}
    return deepspeed.initialize(model=m, model_parameters=list(m.parameters()), config=cfg)[0]

def step(e):
    loss = e(x).square().sum()
    e.backward(loss)
    e.step()
    return loss.item()

result = {}
for stage in ((2, 3) if mode == "roundtrip" else (2,)):
    d = out / f"zero{stage}"
    if mode == "roundtrip":
        a = engine(0, stage)
        [step(a) for _ in range(3)]
        a.save_checkpoint(str(d), tag="step-00000003", save_latest=False)
        result[f"saved{stage}"] = [step(a) for _ in range(2)]
    b = engine(1, stage)  # other initial weights: only the checkpoint can make its losses match
    try:
        ck.load(b, d, "step-00000003")
    except ck.UntrustedCheckpoint as e:
        result[f"refused{stage}"] = str(e)
        continue
    result[f"resumed_at{stage}"] = b.global_steps
    result[f"resumed{stage}"] = [step(b) for _ in range(2)]
print(json.dumps(result))
"""


def _deepspeed(tmp: Path, out: Path, mode: str) -> dict:
    from motioncharacter.stack import free_port

    env = train_env(tmp)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-c", DEEPSPEED_ROUNDTRIP, str(out), mode], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


class OpensAFile:
    """What an attacker would plant: unpickling it calls a function (here a harmless open())."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _plant(shard: Path, marker: Path) -> None:
    import torch

    sd = torch.load(shard, weights_only=False)  # our own file, written just now
    sd["planted"] = OpensAFile(str(marker))
    torch.save(sd, shard)


def test_deepspeed_checkpoints_resume_with_weights_only_and_a_foreign_object_is_refused(tmp_path):
    """ZeRO-2 (the default) and ZeRO-3 save, then resume into an engine with other weights under
    the allow-list with identical next losses; a planted object in a shard is refused unrun."""
    import torch

    out = tmp_path / "ckpt"
    r = _deepspeed(tmp_path, out, "roundtrip")
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in ck.allowed_globals()}
    for stage in (2, 3):
        shards = sorted((out / f"zero{stage}" / "step-00000003").glob("*.pt"))
        assert len(shards) == 2 and all(set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) <= allowed
                                        for f in shards)
        assert r[f"resumed_at{stage}"] == 3
        assert r[f"resumed{stage}"] == r[f"saved{stage}"]  # weights and Adam moments both came back

    # a foreign object in the ZeRO optimizer shard: DeepSpeed's own load path reaches the allow-list
    shards = sorted((out / "zero2" / "step-00000003").glob("*.pt"))
    optim = next(f for f in shards if "optim_states" in f.name)
    _plant(optim, tmp_path / "ran-optim")
    refused = _deepspeed(tmp_path, out, "load")["refused2"]
    assert optim.name in refused and "allow-list" in refused, refused
    assert not (tmp_path / "ran-optim").exists(), "the planted object ran"

    # and in the model states, through the engine's load itself; unpickled unsafely it does run
    model = next(f for f in shards if "model_states" in f.name)
    _plant(model, tmp_path / "ran-model")
    with pytest.raises(ck.UntrustedCheckpoint, match="model_states.pt pickles something outside"):
        ck._safe_engine_class()(None).load(str(model), map_location="cpu")
    assert not (tmp_path / "ran-model").exists()
    torch.load(model, weights_only=False)
    assert (tmp_path / "ran-model").exists()
