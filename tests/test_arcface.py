"""Eq. 4 with ArcFace: the insightface recognition ONNX as a torch module, the differentiable
5-point alignment, landmarks from the manifest into batches, timestep weighting, the refusal
on real weights without a face model, and the face-model tag on the MLflow run.

A small recogniser exported here from torch (same input/output convention as insightface's
w600k_r50.onnx) stands in for the real pack; nothing is downloaded."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from train_fixtures import copy_prepared, prepared

from motioncharacter.model.arcface import (ARCFACE_TEMPLATE, ArcFace, align_faces, find_recognition_onnx,
                                           similarity_transform)


class TinyRecognizer(nn.Module):
    """iresnet's building blocks (conv, BN, PReLU, flatten, linear, BN1d) at toy widths:
    (N, 3, 112, 112) in [-1, 1] -> (N, 32), like w600k_r50's (N, 512)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.PReLU(16))
        self.fc, self.bn = nn.Linear(16 * 28 * 28, 32), nn.BatchNorm1d(32)

    def forward(self, x):
        return self.bn(self.fc(torch.flatten(self.body(x), 1)))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """A folder laid out like an insightface pack: a detector-named decoy and the recogniser."""
    d = tmp_path_factory.mktemp("buffalo_tiny")
    torch.manual_seed(0)
    m = TinyRecognizer().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding them is tested too
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():  # the TorchScript exporter: deprecated, but deterministic and fast
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(m, torch.zeros(1, 3, 112, 112), str(d / "w600k_tiny.onnx"), input_names=["input.1"],
                          output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}}, dynamo=False)
    (d / "det_10g.onnx").write_bytes(b"not a recogniser")
    return d


# ---- alignment ------------------------------------------------------------------------------

def test_similarity_transform_hand_cases():
    # points = 2 x template + (10, 20): the map back is scale 1/2, no rotation, shift (-5, -10)
    m = similarity_transform(ARCFACE_TEMPLATE * 2 + torch.tensor([10.0, 20.0]), ARCFACE_TEMPLATE)
    assert torch.allclose(m, torch.tensor([[0.5, 0.0, -5.0], [0.0, 0.5, -10.0]]), atol=1e-4)
    # a known similarity (scale 1.7, 30 degrees, shift (40, -3)) maps the template exactly
    c, s = 1.7 * math.cos(math.pi / 6), 1.7 * math.sin(math.pi / 6)
    known = torch.tensor([[c, -s, 40.0], [s, c, -3.0]])
    pts = ARCFACE_TEMPLATE @ known[:, :2].T + known[:, 2]
    est = similarity_transform(ARCFACE_TEMPLATE[None], pts[None])[0]
    assert torch.allclose(est, known, atol=1e-4)
    assert torch.allclose(ARCFACE_TEMPLATE @ est[:, :2].T + est[:, 2], pts, atol=1e-3)


def test_align_faces_pixel_convention_and_gradient():
    """On a linear ramp bilinear sampling is exact, so each output pixel must read the ramp at
    exactly the inverse-mapped source position (pixel centres at integers, as cv2 warps)."""
    h, w = 150, 170
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img = torch.stack([xs, ys, xs + ys])[None].requires_grad_(True)
    c, s = 1.2 * math.cos(0.3), 1.2 * math.sin(0.3)
    lm = ARCFACE_TEMPLATE @ torch.tensor([[c, -s], [s, c]]).T + torch.tensor([30.0, 10.0])  # a tilted face
    out = align_faces(img, lm[None], size=112)
    assert out.shape == (1, 3, 112, 112)
    m = similarity_transform(lm[None], ARCFACE_TEMPLATE)[0]
    v, u = 60, 45  # output pixel (x=u, y=v) reads source point A^-1 ((u, v) - t)
    src = torch.linalg.solve(m[:, :2], torch.tensor([u, v], dtype=torch.float32) - m[:, 2])
    assert out[0, 0, v, u].item() == pytest.approx(src[0].item(), abs=1e-2)
    assert out[0, 1, v, u].item() == pytest.approx(src[1].item(), abs=1e-2)
    # the nose tip lands on the template's: its source position is the landmark
    src = torch.linalg.solve(m[:, :2], ARCFACE_TEMPLATE[2] - m[:, 2])
    assert torch.allclose(src, lm[2], atol=1e-3)
    out.sum().backward()
    assert img.grad.abs().sum() > 0


def test_align_faces_matches_insightface_norm_crop():
    """Same crop as insightface's norm_crop (cv2.warpAffine, bilinear) up to cv2's 1/32-pixel
    fixed-point interpolation."""
    import cv2

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((300, 260, 3)).astype(np.float32), (0, 0), 3)
    c, s = 2.3 * math.cos(0.35), 2.3 * math.sin(0.35)
    lm = ARCFACE_TEMPLATE.numpy() @ np.array([[c, -s], [s, c]]).T + np.array([40.0, 30.0])
    m = similarity_transform(torch.tensor(lm, dtype=torch.float32)[None], ARCFACE_TEMPLATE)[0].numpy()
    want = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    got = align_faces(torch.from_numpy(img).permute(2, 0, 1)[None], torch.tensor(lm, dtype=torch.float32)[None])
    assert np.abs(got[0].permute(1, 2, 0).numpy() - want).max() < 0.02


# ---- the recogniser -----------------------------------------------------------------------------

def test_arcface_from_onnx_matches_onnxruntime_and_passes_gradients(pack):
    import onnxruntime as ort

    face = ArcFace(pack)  # the pack folder: the recogniser is found by name, the detector left alone
    assert face.name == "arcface:w600k_tiny.onnx" and face.dim == 32 and face.input_size == 112
    assert not face.raw_pixels  # a modern export: (x - 127.5) / 127.5 outside the graph
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sess = ort.InferenceSession(str(pack / "w600k_tiny.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input.1": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(face.net(x).numpy() - want).max() < 1e-4
        emb = face(x)
    assert torch.allclose(emb, torch.nn.functional.normalize(torch.from_numpy(want), dim=-1), atol=1e-4)
    assert all(not p.requires_grad for p in face.parameters())
    x.requires_grad_(True)
    face(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_arcface_mxnet_style_graph_gets_raw_pixels(tmp_path):
    """Graphs that subtract and scale themselves (a Sub and a Mul first, insightface's test) take
    0..255 pixels: the module converts our [-1, 1] input back."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["data", "mean"], ["c"], name="Sub_0"),
             helper.make_node("Mul", ["c", "scale"], ["d"], name="Mul_1"),
             helper.make_node("GlobalAveragePool", ["d"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["fc1"], name="flat")]
    inits = [helper.make_tensor("mean", TensorProto.FLOAT, [], [127.5]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 127.5])]
    g = helper.make_graph(nodes, "mx", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, 112, 112])],
                          [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [None, 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "arcface_mx.onnx"))
    face = ArcFace(tmp_path / "arcface_mx.onnx")
    assert face.raw_pixels
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(face(x), torch.nn.functional.normalize(x.mean((2, 3)), dim=-1), atol=1e-5)


def test_find_recognition_onnx_says_what_is_missing(tmp_path):
    (tmp_path / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="det_10g.onnx.*w600k_r50.onnx"):
        find_recognition_onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_recognition_onnx(tmp_path / "nope")
    (tmp_path / "model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="not an .onnx"):
        find_recognition_onnx(tmp_path / "model.pth")


# ---- settings ------------------------------------------------------------------------------------

def test_id_loss_refused_on_real_weights_without_a_face_model(pack):
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import ConfigError, load

    for extra in ([], ["loss.face_model=tiny-random"], ["model.preset=mini", "model.weights="]):
        with pytest.raises(ConfigError, match=r"model\.arcface_pack=DIR.*w600k_r50\.onnx.*loss\.id_loss=false"):
            load(TrainConfig, "train.yaml", overrides=["model.weights=/models/sd15", *extra])
    assert not load(TrainConfig, "train.yaml", overrides=["model.weights=/m", "loss.id_loss=false"]).loss.id_loss
    tiny = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny"])
    assert tiny.face_model_source() == ""  # auto on the tiny preset: the random CNN
    real = load(TrainConfig, "train.yaml", overrides=["model.weights=/m", f"model.arcface_pack={pack}"])
    assert real.face_model_source() == str(pack)
    onnx_only = load(TrainConfig, "train.yaml",
                     overrides=["model.weights=/m", f"loss.face_model={pack}/w600k_tiny.onnx"])
    assert onnx_only.face_model_source().endswith("w600k_tiny.onnx")
    with pytest.raises(ConfigError, match="model.arcface_pack"):
        load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "loss.face_model=arcface"])
    with pytest.raises(ConfigError, match="id_weighting"):
        load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "loss.id_weighting=snr"])


# ---- landmarks: manifest -> batch ----------------------------------------------------------------

@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return prepared(tmp_path_factory)


def test_resize_crop_points_hand_case():
    from motioncharacter.components.train.data import resize_crop_points

    # 100 x 200 (h x w) -> short side 50: 50 x 100, centre crop drops 25 px on the left
    got = resize_crop_points(np.array([[100.0, 50.0], [-0.5, -0.5]]), (100, 200), 50)
    assert np.allclose(got, [[(100.5 * 0.5 - 0.5) - 25, 50.5 * 0.5 - 0.5], [-25.5, -0.5]])


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_batch_landmarks_sit_on_the_face_of_the_training_frame(prep, flip):
    """Landmarks recorded by data preparation, carried through resize-crop (and the flip), agree
    with YuNet run on the training frame itself, point for point in image order."""
    from motioncharacter.components.train.data import ManifestDataset, read_manifest
    from motioncharacter.components.train.settings import DataSettings
    from motioncharacter.faces import detector

    m = read_manifest(str(prep / "manifest.jsonl"))
    i = next(k for k, r in enumerate(m.records) if not r["still"])
    assert len(m.records[i]["landmarks"]) == len(m.records[i]["frames"])
    ds = ManifestDataset(m, DataSettings(num_frames=4, num_workers=0, flip_prob=flip), 256, seed=0)
    item = ds[(0, 0, i)]
    assert item["landmark_valid"].sum() >= 3 and item["ref_landmark_valid"] == 1
    for f in range(4):
        if not item["landmark_valid"][f]:
            continue
        rgb = ((item["frames"][f].transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        found = detector().detect(rgb)
        assert found, f"no face in training frame {f}"
        assert np.abs(found[0].landmarks - item["landmarks"][f]).max() < 6.0, (found[0].landmarks, item["landmarks"][f])
    # the reference crop's landmarks, from the same detection as its ID embedding
    found = detector().detect(item["ref"])
    assert np.abs(found[0].landmarks - item["ref_landmarks"]).max() < 1e-3


def test_manifest_without_landmarks_still_loads(prep, tmp_path, caplog):
    """A manifest prepared before landmarks existed trains, with eq. 4 skipped and a warning."""
    from motioncharacter.components.train.data import ManifestDataset, read_manifest
    from motioncharacter.components.train.settings import DataSettings

    old = copy_prepared(prep, tmp_path / "old")
    recs = [json.loads(x) for x in (old / "manifest.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("landmarks", None)
    (old / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = read_manifest(str(old / "manifest.jsonl"))
    item = ManifestDataset(m, DataSettings(num_frames=4, num_workers=0), 64, seed=0)[(0, 0, 0)]
    assert item["landmarks"].shape == (4, 5, 2) and item["landmark_valid"].sum() == 0
    assert "no face landmarks" in caplog.text and "data prepare" in caplog.text


# ---- the training step ---------------------------------------------------------------------------

def test_training_id_term_weights_by_alpha_bar_and_skips_without_faces(prep):
    """The training step's eq. 4 on a real micro-batch (compute_loss calls it with the UNet's
    prediction; here a fixed one, so t is known): alpha-bar weighting multiplies the unweighted
    term by alpha-bar_t exactly; a timestep bound at or below t, a reference whose face was not
    found again, or a dropped reference turns it off."""
    from motioncharacter.components.train import trainer as T
    from motioncharacter.components.train.data import ManifestDataset, loader, read_manifest
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load
    from motioncharacter.model.presets import build_tiny

    cfg = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "data.num_frames=4", "data.image_dropout=0",
                                                     "data.cond_dropout=0", "loss.id_frame_stride=2"])
    parts = build_tiny(seed=0)
    parts["vae"].requires_grad_(False)
    m = read_manifest(str(prep / "manifest.jsonl"))
    batch = next(iter(loader(ManifestDataset(m, cfg.data, 64), 2, 0, 1, 0)))
    assert batch["landmark_valid"].shape == (2, 4) and batch["landmark_valid"].sum() > 0
    fmodel = T.face_model(cfg)
    assert fmodel.name == "tiny-random"
    g = torch.Generator().manual_seed(3)
    h = 64 // 2 ** (len(parts["vae"].config.block_out_channels) - 1)  # latents of the 64-px frames
    noisy = torch.randn(2, 4, 4, h, h, generator=g)
    pred = torch.randn(2, 4, 4, h, h, generator=g, requires_grad=True)
    t, keep = torch.tensor([200, 700]), torch.ones(2)

    def id_term(c, b=batch, k=keep, tt=t):
        n = len(tt)
        return T._id_loss(parts, fmodel, b, c, pred[:n], noisy[:n], tt, k, False, torch.device("cpu"), torch.float32)

    def with_loss(**kw):
        return replace(cfg, loss=replace(cfg.loss, **kw))

    a = parts["scheduler"].alphas_cumprod
    one = dict(batch, **{k: v[:1] for k, v in batch.items() if isinstance(v, torch.Tensor)})
    plain1 = id_term(with_loss(id_weighting="none"), one, keep[:1], t[:1])
    weighted1 = id_term(cfg, one, keep[:1], t[:1])
    assert plain1.item() > 0
    assert weighted1.item() == pytest.approx(a[200].item() * plain1.item(), rel=1e-4)
    weighted = id_term(cfg)
    weighted.backward()
    assert pred.grad.abs().sum() > 0  # eq. 4 reaches the noise prediction
    # a bound of 700 keeps only the first sample: its weighted term, averaged over that one clip
    assert id_term(with_loss(id_max_timestep=700)).item() == pytest.approx(weighted1.item(), rel=1e-4)
    assert id_term(with_loss(id_max_timestep=200)).item() == 0.0
    assert id_term(cfg, dict(batch, ref_landmark_valid=torch.zeros(2))).item() == 0.0
    assert id_term(cfg, k=torch.zeros(2)).item() == 0.0


def test_face_model_from_pack_is_arcface(pack):
    from motioncharacter.components.train import trainer as T
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load

    cfg = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", f"loss.face_model={pack}"])
    fm = T.face_model(cfg)
    assert isinstance(fm, ArcFace) and fm.name == "arcface:w600k_tiny.onnx"


def test_mlflow_run_names_the_face_model(stack, tmp_path):
    from mlflow import MlflowClient

    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.components.train.trainer import Trainer, _Tracker
    from motioncharacter.config import load

    cfg = load(TrainConfig, "train.yaml", overrides=["model.preset=tiny", "experiment=arcface-tag-test"])
    t = Trainer(cfg, "m.jsonl", str(tmp_path / "out"))
    t.face_model_name = "arcface:w600k_tiny.onnx"
    tr = _Tracker(t, SimpleNamespace(sha256="0" * 64, records=[]), {}, None)
    tr.start()
    tr.end()
    run = MlflowClient(stack.mlflow_uri).get_run(tr.run_id)
    assert run.data.tags["face_model"] == "arcface:w600k_tiny.onnx"
