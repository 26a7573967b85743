"""The container images cannot be built here (no Docker engine), so their Dockerfiles are
parsed and checked for what matters: pinned bases, dependencies exactly as pinned in
pyproject, a non-root user that matches the Kubernetes manifests, the right entry point,
and a build context that carries what the build copies and nothing it must not."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = {  # Dockerfile -> expected base image family
    "Dockerfile": r"python:3\.11\.\d+-slim-bookworm",
    "Dockerfile.cuda": r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d",
    # a release with the fixes of NVIDIA's 2026 Triton bulletins (5828: r26.03 ... 5875: r26.07), so
    # also past the December 2025 one (CVE-2025-33201): 26.07 or later
    "Dockerfile.triton": r"nvcr\.io/nvidia/tritonserver:(26\.(0[7-9]|1[0-2])|2[7-9]\.\d\d)-py3",
}
COMMANDS = {"Dockerfile": ["motioncharacter", "--help"], "Dockerfile.cuda": ["motioncharacter", "--help"],
            "Dockerfile.triton": ["tritonserver", "--help"]}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    if buf.strip():
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def instructions(name: str) -> list[tuple[str, str]]:
    return parse_dockerfile((DOCKER / name).read_text())


def test_parser_on_a_hand_written_case():
    text = "# c\nFROM a:1 AS b\n\nRUN x \\\n  # note\n  && y\nENTRYPOINT [\"m\"]\n"
    assert parse_dockerfile(text) == [("FROM", "a:1 AS b"), ("RUN", "x && y"), ("ENTRYPOINT", '["m"]')]
    with pytest.raises(ValueError):
        parse_dockerfile("RUN a \\\n")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_image_is_pinned(name):
    froms = [args for instr, args in instructions(name) if instr == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert "$" not in image, "the base must be fixed in the file, not a build argument"
    image, _, digest = image.partition("@")  # docker/pin_digests.py adds @sha256:<64 hex>
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest" and "/" not in tag, image
    assert re.fullmatch(IMAGES[name], image), image


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runs_as_the_non_root_user_the_manifests_expect(name):
    ins = instructions(name)
    users = [args for instr, args in ins if instr == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    last_user = max(i for i, (instr, _) in enumerate(ins) if instr == "USER")
    assert not [a for instr, a in ins[last_user:] if instr == "RUN"], "nothing may run after the final USER"
    # the Kubernetes pods that use this image run as the same uid
    k8s_files = {"Dockerfile": ["base/mlflow.yaml", "training/base/pytorchjob.yaml", "training/trainjob/base/trainjob.yaml"],
                 "Dockerfile.cuda": ["training/base/pytorchjob.yaml", "training/trainjob/base/trainjob.yaml"],
                 "Dockerfile.triton": ["base/triton.yaml"]}
    for f in k8s_files[name]:
        uids = {int(m) for m in re.findall(r"runAsUser: (\d+)", (ROOT / "k8s" / f).read_text())}
        assert uids == {int(uid)}, (f, uids)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_no_entrypoint_and_an_exec_form_command(name):
    """No ENTRYPOINT: Kubernetes' command/args and kfp's ``sh -c ...`` must run as given (an
    ENTRYPOINT of ``motioncharacter`` received ``sh`` as its subcommand); CMD in exec form."""
    ins = instructions(name)
    assert not [args for instr, args in ins if instr == "ENTRYPOINT"]
    cmd = [args for instr, args in ins if instr == "CMD"]
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == COMMANDS[name]  # exec form: signals reach the process
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["motioncharacter"] == "motioncharacter.cli:main"


def _pip_installs(name: str) -> list[list[str]]:
    out = []
    for instr, args in instructions(name):
        if instr != "RUN":
            continue
        for part in re.split(r"&&|;", args):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    out.append(words[i + 2:])
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_installs_only_what_pyproject_pins(name):
    installs = _pip_installs(name)
    assert installs, "no pip install"
    takes_value = {"-r", "--requirement", "--extra-index-url", "--index-url", "-c", "--constraint"}
    for words in installs:
        it = iter(words)
        for w in it:
            if w in takes_value:
                value = next(it)
                if w in ("-r", "--requirement"):  # the whole lock, every file by its hash; the build backend
                    assert value in ("requirements.lock.hashes", "/build/src/docker/build-requirements.txt"), value
                    assert "--require-hashes" in words and "--no-deps" in words, words
                assert w not in ("--extra-index-url", "--index-url"), f"{name} adds an index: {words}"
                continue
            if w.startswith("-"):
                continue
            assert w.startswith(("/", ".")) or "==" in w, f"unpinned install of {w!r} in {name}"
            if w.startswith(("/", ".")):  # build isolation would fetch an unpinned build backend
                assert "--no-build-isolation" in words, words
    text = (DOCKER / name).read_text()
    assert "COPY requirements.lock.hashes" in text and "^# NOT HASHED" in text  # a hole fails the build
    # apt lists are cleaned in the same layer that fills them
    for instr, args in instructions(name):
        if instr == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args


def test_project_images_carry_python_3_11_as_pyproject_requires():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.12"
    assert "python:3.11." in (DOCKER / "Dockerfile").read_text()
    for name in ("Dockerfile.cuda", "Dockerfile.triton"):
        assert "python3.11 -m venv /opt/venv" in (DOCKER / name).read_text()
    triton = (DOCKER / "Dockerfile.triton").read_text()
    assert "-DPYTHON_EXECUTABLE=/usr/bin/python3.11" in triton  # the stub built for 3.11, at the image's branch
    branch = re.search(r"tritonserver:(\d\d)\.(\d\d)-py3", triton).groups()
    assert f"ARG TRITON_BRANCH=r{branch[0]}.{branch[1]}" in triton


def test_requirements_script_emits_the_pins_and_refuses_loose_ones(tmp_path):
    script = DOCKER / "pyproject_requirements.py"
    out = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "--extra", "server"],
                         capture_output=True, text=True, check=True).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out == project["dependencies"] + project["optional-dependencies"]["server"]
    assert all("==" in r for r in out)
    assert any(r.startswith("psycopg2-binary==") for r in out) and any(r.startswith("boto3==") for r in out)

    loose = tmp_path / "pyproject.toml"
    loose.write_text('[project]\nname = "x"\ndependencies = ["numpy==1.26.4", "torch>=2"]\n')
    bad = subprocess.run([sys.executable, str(script), str(loose)], capture_output=True, text=True)
    assert bad.returncode != 0 and "torch>=2" in bad.stderr
    missing = subprocess.run([sys.executable, str(script), str(loose), "--extra", "nope"], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore matching for these checks (no negations are used)."""
    for p in patterns:
        p = p.rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, f"{p}/*"):
            return True
        if p.startswith("**/") and fnmatch.fnmatch(Path(path).name, p[3:]):
            return True
    return False


def test_build_context_keeps_sources_and_drops_local_state():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]
    for must_go in (".venv", ".git", "mlflow.db", "outputs/x.mp4", "weights/unet.safetensors", ".env"):
        assert _ignored(must_go, patterns), must_go
    # what the builds copy, and what `pip install .` needs from pyproject
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "docker/pyproject_requirements.py", project["project"]["readme"],
              *project["tool"]["setuptools"]["package-dir"].values()]
    for path in needed:
        assert not _ignored(path, patterns), path
        assert (ROOT / path).exists(), f"{path} is needed by the image build but missing"
    for name in IMAGES:
        for instr, args in instructions(name):
            if instr == "COPY" and not args.startswith("--from"):
                for src in args.split()[:-1]:
                    assert src == "." or (ROOT / src).exists(), (name, src)


def test_kubernetes_uses_the_images_built_here():
    """The names the manifests and kustomize `images:` use are the ones the Dockerfiles document."""
    for overlay, tag in (("overlays/local", "0.1.0"), ("overlays/production", "0.1.0")):
        kust = yaml.safe_load((ROOT / "k8s" / overlay / "kustomization.yaml").read_text())
        names = {i["name"]: i["newTag"] for i in kust["images"]}
        assert names["ghcr.io/motioncharacter/motioncharacter"] == tag
        assert "ghcr.io/motioncharacter/motioncharacter-triton" in names
    prod_train = yaml.safe_load((ROOT / "k8s/training/overlays/production/kustomization.yaml").read_text())
    assert prod_train["images"][0]["newTag"].endswith("-cuda")
    for name, image in (("Dockerfile", "ghcr.io/motioncharacter/motioncharacter:"),
                        ("Dockerfile.cuda", "ghcr.io/motioncharacter/motioncharacter:0.1.0-cuda"),
                        ("Dockerfile.triton", "ghcr.io/motioncharacter/motioncharacter-triton:")):
        assert f"-t {image}" in (DOCKER / name).read_text(), name


def test_lock_hashes_cover_the_lock_and_name_what_is_missing():
    """requirements.lock.hashes (docker/lock-hashes.sh) holds every pin of the lock and the server
    extra, each with a sha256, or says in a NOT HASHED line that it could not be hashed."""
    hashed = (ROOT / "requirements.lock.hashes").read_text()
    entries = re.findall(r"^([A-Za-z0-9._-]+==\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", hashed, re.M)
    missing = re.findall(r"^# NOT HASHED .*: (\S+)$", hashed, re.M)
    lock = {p for p in (ROOT / "requirements.lock").read_text().split() if "==" in p}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert lock | set(project["optional-dependencies"]["server"]) == {p for p, _ in entries} | set(missing)
    assert len(entries) > 200
    assert missing == []  # every pin has a file on PyPI for the images' platforms (the tag list has no gaps)
    script = (DOCKER / "lock-hashes.sh").read_text()
    assert "--report" in script and "PIP_CONFIG_FILE=/dev/null" in script and "NOT HASHED" in script
    assert subprocess.run(["bash", "-n", str(DOCKER / "lock-hashes.sh")]).returncode == 0


# ---- headless OpenCV only ----------------------------------------------------------------------
def test_only_headless_opencv_is_installed_and_cv2_links_no_gui():
    """insightface and pypiqe declare opencv-python (the GUI build: libGL, X11, Qt, which the images
    lack); it shares the cv2 module with the headless build and overwrites it."""
    import importlib.metadata as md

    import cv2

    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert "opencv-python-headless" in names and "opencv-python" not in names
    libs = [p for p in Path(cv2.__file__).parent.rglob("*.so*")]
    linked = subprocess.run(["ldd", *map(str, libs)], capture_output=True, text=True).stdout
    assert not re.search(r"libGL\.|libX11|libQt|libgtk", linked), "cv2 links a GUI library"


def test_gui_opencv_dependents_install_without_their_deps():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    nodeps = [x.strip() for x in (ROOT / "requirements-nodeps.txt").read_text().splitlines()
              if x.strip() and not x.startswith("#")]
    # gradio: not for OpenCV, but its pillow<13 against the project's pillow 13 (README, `ui`)
    assert {x.split("==")[0] for x in nodeps} == {"insightface", "pypiqe", "gradio"}
    assert not any(d.startswith(("insightface", "pypiqe", "opencv-python==", "gradio==")) for d in deps)
    assert "--no-deps -c requirements.lock -r requirements-nodeps.txt" in (ROOT / "setup.sh").read_text()
    # the images install the whole lock without resolving (so no opencv-python), and it holds none
    lock = (ROOT / "requirements.lock").read_text().split()
    assert not [p for p in lock if p.startswith("opencv-python==")] and "insightface==2.1" in lock
    for name in IMAGES:
        text = (ROOT / "docker" / name).read_text()
        assert re.search(r"pip install --require-hashes --no-deps -r requirements\.lock\.hashes", text), name


# ---- docker/pin_digests.py: the registries cannot be reached here, so the lookup is passed in; the
# ---- HTTP part (resolve) runs only where they can be (it says so in its help)
def _pin():
    sys.path.insert(0, str(DOCKER))
    try:
        import pin_digests
    finally:
        sys.path.remove(str(DOCKER))
    return pin_digests


def test_pin_digests_rewrites_every_third_party_image_and_leaves_ours():
    pin = _pin()
    digest = "sha256:" + "ab" * 32
    seen = []
    for f in pin.files():
        text = f.read_text()
        new, refs = pin.pin_text(text, lambda r: (seen.append(r), digest)[1])
        for ref in refs:
            assert f"{ref}@{digest}" in new and "@" not in ref
        # what is left unpinned in the new text is only the project's own images
        assert pin.pin_text(new, lambda r: digest)[1] == []
        assert new.count("motioncharacter:") == text.count("motioncharacter:")
    assert {r.split(":")[0] for r in seen} >= {"python", "nvidia/cuda", "nvcr.io/nvidia/tritonserver",
                                               "quay.io/minio/minio", "postgres"}
    assert not any("motioncharacter" in r for r in seen)


def test_pin_digests_parses_references_and_challenges():
    pin = _pin()
    assert pin.split_reference("python:3.11-slim") == ("registry-1.docker.io", "library/python", "3.11-slim")
    assert pin.split_reference("nvidia/cuda:13.0.2") == ("registry-1.docker.io", "nvidia/cuda", "13.0.2")
    assert pin.split_reference("nvcr.io/nvidia/tritonserver:25.08-py3") == ("nvcr.io", "nvidia/tritonserver", "25.08-py3")
    assert pin.split_reference("localhost:5000/x/y") == ("localhost:5000", "x/y", "latest")
    assert pin.split_reference("postgres:17@sha256:" + "0" * 64) is None  # already pinned
    assert pin.split_reference("ghcr.io/motioncharacter/motioncharacter:0.1.0") is None
    text = "FROM python:3.11 AS build\nFROM build\n"
    assert pin.pin_text(text, lambda r: "sha256:1")[1] == ["python:3.11"]  # a stage is not an image
    c = pin.parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                            'scope="repository:library/python:pull"')
    assert c == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                 "scope": "repository:library/python:pull"}


def test_cpu_triton_image_is_the_project_image_serving_models():
    from motioncharacter.images import IMAGES
    from motioncharacter.pipelines.pipeline import IMAGE

    ins = instructions("Dockerfile.triton-cpu")
    assert [a for i, a in ins if i == "FROM"] == [IMAGE]  # the tritonserver and backend of the pinned wheel
    assert not [a for i, a in ins if i == "ENTRYPOINT"]
    assert json.loads([a for i, a in ins if i == "CMD"][0])[:4] == ["motioncharacter", "serve", "--model-repository",
                                                                  "/models"]
    built = [i.dockerfile for i in IMAGES]
    assert sorted(built) == sorted(f"docker/{p.name}" for p in DOCKER.glob("Dockerfile*"))
    assert built.index("docker/Dockerfile") < built.index("docker/Dockerfile.triton-cpu")  # its base first


def test_build_command_lends_the_ca_bundle_read_only_and_replaces_the_base(tmp_path):
    from motioncharacter.images import CA_BUNDLE, IMAGES, build_command

    cpu = IMAGES[0]
    cmd = build_command("podman", cpu, tmp_path, "localhost/motioncharacter-base:bookworm", lend_ca=True)
    assert cmd[:2] == ["podman", "build"] and cmd[-1] == str(tmp_path)
    assert cmd[cmd.index("-t") + 1] == cpu.tag
    assert cmd[cmd.index("--from") + 1] == "localhost/motioncharacter-base:bookworm"
    assert "--pull=never" in cmd  # never a registry for a base made here
    if Path(CA_BUNDLE).is_file():
        assert cmd[cmd.index("-v") + 1] == f"{CA_BUNDLE}:{CA_BUNDLE}:ro"
    assert "-v" not in build_command("podman", cpu, tmp_path, None, lend_ca=False)
    with pytest.raises(Exception, match="--from"):
        build_command("docker", cpu, tmp_path, "localhost/x:y", lend_ca=False)
