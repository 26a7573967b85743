"""``motioncharacter generate`` end to end on the tiny preset, and its input errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from motioncharacter.cli import main

TWO_PEOPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "examples_two_people.jpg"


@pytest.fixture(scope="module")
def hopper() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/sample_data/grace_hopper.jpg")


@pytest.fixture(scope="module")
def astronaut() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")


def _args(image, out, *extra):
    return ["generate", "--preset", "tiny", "--image", str(image), "--prompt", "a person talking",
            "--action", "talking", "--intensity", "6", "--steps", "2", "--out", str(out), *extra]


def test_generate_mp4_through_entry_point(hopper, tmp_path):
    out = tmp_path / "v.mp4"
    exe = Path(sys.executable).parent / "motioncharacter"
    r = subprocess.run([str(exe), *_args(hopper, out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "face embedder: sface" in r.stdout
    assert "denoising" in r.stderr  # the tqdm bar
    import av

    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)


def test_generate_gif(astronaut, tmp_path, capsys):
    out = tmp_path / "v.gif"
    assert main(_args(astronaut, out, "--frames", "4", "--height", "32", "--width", "48", "--seed", "7")) == 0
    with Image.open(out) as im:
        assert im.n_frames == 4 and im.size == (48, 32)


def _fails(argv, capsys) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_nan_intensity(hopper, tmp_path, capsys):
    assert "intensity must be a finite number" in _fails(_args(hopper, tmp_path / "o.mp4", "--intensity", "nan"),
                                                         capsys)


def test_no_face_image(tmp_path, capsys):
    img = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(img)
    assert "no face found" in _fails(_args(img, tmp_path / "o.mp4"), capsys)


@pytest.mark.skipif(not TWO_PEOPLE.is_file(), reason="../shared/data/faces/examples_two_people.jpg is absent")
def test_two_faces_needs_face_index(tmp_path, capsys):
    err = _fails(_args(TWO_PEOPLE, tmp_path / "o.mp4"), capsys)
    assert "faces" in err and "--face-index" in err
    assert "out of range" in _fails(_args(TWO_PEOPLE, tmp_path / "o.mp4", "--face-index", "9"), capsys)


def test_unreadable_and_missing_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert "not a readable image" in _fails(_args(bad, tmp_path / "o.mp4"), capsys)
    assert "no such file" in _fails(_args(tmp_path / "nope.jpg", tmp_path / "o.mp4"), capsys)


def test_oversized_image_refused(tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((6500, 6500), np.uint8)).save(big, compress_level=1)  # 42 megapixels
    assert "pixel limit" in _fails(_args(big, tmp_path / "o.mp4"), capsys)


def test_bad_output_suffix(hopper, tmp_path, capsys):
    assert ".mp4 or .gif" in _fails(_args(hopper, tmp_path / "o.avi"), capsys)


def test_long_prompt_warns_truncated(hopper, tmp_path, caplog):
    argv = _args(hopper, tmp_path / "o.gif", "--steps", "1")
    argv[argv.index("--prompt") + 1] = "a person talking happily in a sunny park " * 12
    with caplog.at_level("WARNING", logger="motioncharacter.model"):
        assert main(argv) == 0
    assert any("prompt is" in r.message and "truncated" in r.message for r in caplog.records)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for opt in ("--weights", "--preset", "--negative-prompt", "--frames", "--steps", "--guidance", "--height",
                "--width", "--seed", "--id-scale", "--motion-scale", "--face-index", "--intensity", "--action"):
        assert opt in text
