"""The optional weight-backed parts of data preparation, loaded for real from tiny random models
saved in the users' formats: torchvision RAFT (safetensors state dict) and CLIP-IQA (transformers
CLIP folder). Their numbers are meaningless; what is tested is loading and the output contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from motioncharacter.components.prepare.flow import RAFTFlow, make_estimator, measure


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory):
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.safetensors"
    save_file({k: v.contiguous() for k, v in raft_small(weights=None).state_dict().items()}, str(path))
    return path


def test_raft_loads_and_measures(raft_file):
    est = RAFTFlow(str(raft_file), small=True, iters=2)
    frames = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    flow = est(frames)
    assert flow.shape == (2, 128, 128, 2) and np.isfinite(flow).all()
    m, mags, masks = measure(frames, est, flow_short_side=128)
    assert np.isfinite(m) and mags.shape == (2, 128, 128) and masks.shape == (3, 128, 128)


def test_raft_refuses_pickles_and_needs_weights(tmp_path):
    p = tmp_path / "raft.pth"
    torch.save({}, p)
    with pytest.raises(ValueError, match="pickle"):
        RAFTFlow(str(p))
    with pytest.raises(ValueError, match="needs weights"):
        make_estimator("raft")


def test_clip_iqa_from_a_transformers_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from motioncharacter.components.prepare.filters import ClipIQA, check_quality
    from motioncharacter.model.presets import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer()).save_pretrained(tmp_path)
    iqa = ClipIQA(str(tmp_path))
    frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    s = iqa(frame)
    assert 0.0 <= s <= 1.0
    assert iqa.text.shape == (2, 16)  # projected text embeddings (projection_dim), not hidden states
    reason, info = check_quality(frame, max_piqe=80, clip_iqa=iqa, min_clip_iqa=1.01)  # nothing passes 1.01
    assert reason.startswith("quality: CLIP-IQA") and info == {"clip_iqa": s}
    assert check_quality(frame, max_piqe=80, clip_iqa=iqa, min_clip_iqa=0.0)[0] is None
