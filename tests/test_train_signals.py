"""What training feeds the adapter reaches it: eq. 4's gradient (through the SFace face model),
the intensity label, and the reference crop read by the mini preset's learnable encoder.

Each test disconnects nothing itself; each fails when the feature is disconnected in the code
(a ``.detach()`` on the face model's output or on ``l_id``, the trainer dropping
``batch["intensity"]``, the pipeline or trainer not passing the reference crop)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train_fixtures import prepared


def _cfg(*overrides: str):
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load

    return load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "data.num_frames=4", "data.num_workers=0",
                                                      "data.image_dropout=0", "data.cond_dropout=0",
                                                      "data.text_dropout=0", "data.clip_dropout=0",
                                                      "data.flip_prob=0", *overrides])


def _parts(cfg, ref_encoder: bool = False):
    from motioncharacter.components.train.trainer import MCTrainModule, build_parts
    from motioncharacter.model.adapter import MotionCharacterAdapter

    parts = build_parts(cfg)
    if ref_encoder:
        parts["adapter"] = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128, seed=0,
                                                           ref_encoder_size=32, ref_grid=4).train()
    return parts, MCTrainModule(parts["unet"], parts["adapter"], cfg.model.motion_control)


def _batch(tmp_path_factory, cfg, n: int = 2, intensity: float | None = None) -> dict:
    from torch.utils.data import default_collate

    from motioncharacter.components.train.data import ManifestDataset, read_manifest

    m = read_manifest(str(prepared(tmp_path_factory) / "manifest.jsonl"))
    ds = ManifestDataset(m, cfg.data, 64)
    moving = [i for i, r in enumerate(m.records) if not r.get("still")]
    items = [ds[(0, k, moving[k % len(moving)])] for k in range(n)]
    batch = default_collate(items)
    if intensity is not None:
        batch["intensity"] = torch.full_like(batch["intensity"], float(intensity))
    return batch


def _grads(engine, parts, fmodel, batch, cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    from motioncharacter.components.train.trainer import compute_loss

    engine.zero_grad(set_to_none=True)
    loss, _ = compute_loss(engine, parts, fmodel, batch, cfg, torch.Generator().manual_seed(seed), "cpu",
                           torch.float32)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in engine.adapter.named_parameters()}


def test_sface_in_torch_matches_opencv():
    """The converted SFace gives OpenCV's embedding of a real face (same alignment), and passes gradients."""
    from motioncharacter.faces import detector, embedder
    from motioncharacter.fixtures import package_face
    from motioncharacter.model.arcface import align_faces
    from motioncharacter.model.sface import SFace

    img = package_face("grace_hopper")
    face = detector().one(img)
    ref = embedder().embed(img, face)  # OpenCV's FaceRecognizerSF
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1).requires_grad_(True)
    emb = SFace()(align_faces(x, torch.from_numpy(face.landmarks[None].astype(np.float32)), size=112))
    assert emb.shape == (1, 128)
    assert float(emb[0].detach() @ torch.from_numpy(ref)) > 0.99
    emb.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.slow
def test_id_loss_gradient_reaches_the_adapter(tmp_path_factory):
    """Eq. 4 with SFace changes the adapter's gradient: beta = 0.5 against beta = 0 on the same
    batch, noise and timesteps (all below id_max_timestep). A detached face-model output or l_id
    makes them equal."""
    from motioncharacter.components.train.trainer import face_model

    cfg = _cfg("loss.face_model=sface", "loss.id_max_timestep=1000", "loss.id_weighting=none",
               "loss.id_frame_stride=1")
    parts, engine = _parts(cfg)
    fmodel = face_model(cfg)
    assert fmodel.name == "sface"
    batch = _batch(tmp_path_factory, cfg)
    assert float(batch["landmark_valid"].sum()) > 0 and float(batch["ref_landmark_valid"].sum()) > 0
    cfg.loss.beta = 0.0
    without = _grads(engine, parts, fmodel, batch, cfg)
    cfg.loss.beta = 0.5
    with_id = _grads(engine, parts, fmodel, batch, cfg)
    diff = {n: float((with_id[n] - without[n]).abs().max()) for n in with_id}
    assert max(v for n, v in diff.items() if "to_v_id" in n or "id_encoder" in n) > 0, diff


def test_intensity_label_reaches_the_motion_branch(tmp_path_factory):
    """The same batch at intensity 0 and 20 gives the motion branch different gradients; the
    trainer dropping batch["intensity"] makes them equal."""
    cfg = _cfg()
    parts, engine = _parts(cfg)
    fmodel = None
    cfg.loss.id_loss = False
    g0 = _grads(engine, parts, fmodel, _batch(tmp_path_factory, cfg, intensity=0.0), cfg)
    g20 = _grads(engine, parts, fmodel, _batch(tmp_path_factory, cfg, intensity=20.0), cfg)
    motion = [n for n in g0 if "out_motion" in n or "to_v_motion" in n]
    assert motion and max(float((g0[n] - g20[n]).abs().max()) for n in motion) > 0


def test_few_steps_train_the_intensity_encoder(tmp_path_factory):
    """Two optimizer steps: the first opens the zero-initialised out-projection, the second gives
    the intensity encoder (E_M) a gradient, so its weights move. A trainer that never passes the
    intensity leaves E_M exactly as initialised."""
    from motioncharacter.components.train.trainer import compute_loss

    cfg = _cfg("loss.id_loss=false")
    parts, engine = _parts(cfg)
    before = {n: p.detach().clone() for n, p in engine.adapter.intensity_encoder.named_parameters()}
    opt = torch.optim.Adam([p for p in engine.adapter.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        batch = _batch(tmp_path_factory, cfg, intensity=float(5 * step + 3))
        opt.zero_grad()
        loss, _ = compute_loss(engine, parts, None, batch, cfg, torch.Generator().manual_seed(step), "cpu",
                               torch.float32)
        loss.backward()
        opt.step()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in engine.adapter.intensity_encoder.named_parameters())
    assert moved > 0


def test_reference_crop_reaches_the_learnable_encoder(tmp_path_factory):
    """With a learnable reference encoder (the mini preset's), training reads batch["ref"]: a
    different reference crop changes the gradient of the encoder's weights and the ID tokens."""
    cfg = _cfg("loss.id_loss=false")
    parts, engine = _parts(cfg, ref_encoder=True)
    with torch.no_grad():  # as after a first step: the zero-initialised value projection has opened
        for layer in engine.adapter.mc_layers.values():
            layer.to_v_id.weight.normal_(0, 0.1)
    batch = _batch(tmp_path_factory, cfg)
    g1 = _grads(engine, parts, None, batch, cfg)
    other = dict(batch, ref=torch.flip(batch["ref"], dims=[1]))  # the same face upside down
    g2 = _grads(engine, parts, None, other, cfg)
    names = [n for n in g1 if n.startswith("ref_encoder.")]
    assert names and max(float((g1[n] - g2[n]).abs().max()) for n in names) > 0


def test_pipeline_passes_the_reference_to_a_learnable_encoder(tiny_pipe):
    """Generation feeds the reference crop to an adapter with its own encoder: another face gives
    other ID tokens, hence another video, at the same seed; id_scale 0 removes the difference."""
    from motioncharacter.fixtures import package_face
    from motioncharacter.model.adapter import MotionCharacterAdapter

    _, pipe = tiny_pipe
    saved = pipe.adapter
    try:
        ad = MotionCharacterAdapter.for_unet(pipe.unet, clip_image_dim=32, face_dim=128, seed=0,
                                             ref_encoder_size=32, ref_grid=4)
        with torch.no_grad():
            for layer in ad.mc_layers.values():  # an untrained adapter adds nothing: give the ID branch weight
                layer.to_v_id.weight.normal_(0, 0.5)
        ad.attach(pipe.unet)
        pipe.adapter = ad

        def run(img, id_scale):
            return pipe(img, "a person", num_inference_steps=2, guidance_scale=1.0, num_frames=4, height=64,
                        width=64, seed=3, id_scale=id_scale, output_type="uint8", return_dict=False).astype(float)

        a, b = package_face("grace_hopper"), package_face("astronaut")
        assert np.abs(run(a, 1.0) - run(b, 1.0)).max() > 0
        # at id_scale 0 only the face embedding path differs... which also goes through the ID tokens: none
        assert np.abs(run(a, 0.0) - run(b, 0.0)).max() == 0
    finally:
        pipe.adapter = saved
        saved.attach(pipe.unet)
