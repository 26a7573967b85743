"""The MLflow Model Registry as the system of record for trained adapters.

Every ``motioncharacter train`` registers its adapter as a new version of a registered model
(default ``motioncharacter``, or $MOTIONCHARACTER_REGISTERED_MODEL), its source the adapter's
URI, its lineage as version tags (``lineage.*``). The evaluation of a version tags it with its
run id and key metrics (``eval.*``); the pipeline's quality gate gives a passing version the alias
``challenger``, and ``champion`` follows on request (``motioncharacter registry promote``) or by a
comparison rule.

References (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``) resolve
here, in one place, for ``deploy``, ``evaluate --weights`` and ``compare``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import storage
from .cli import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "motioncharacter"
MODEL_ENV = "MOTIONCHARACTER_REGISTERED_MODEL"
CHALLENGER, CHAMPION = "challenger", "champion"
PREFIX = "models:/"
# Written next to a registered adapter's files: which version they are, so that a weights folder
# assembled from them (the pipeline's) is linked to that version when it is evaluated.
MARKER = "registered_model.json"
# lineage tags of a version (values are strings; "unknown" when a fact was not available)
MANIFEST_TAG, BASE_TAG, BASE_HASH_TAG = "lineage.data_manifest_sha256", "lineage.base_weights", "lineage.base_weights_sha256"
COMMIT_TAG, RUN_TAG, WEIGHTS_TAG = "lineage.git_commit", "lineage.train_run_id", "weights"
EVAL_RUN_TAG = "eval.run_id"
PARTS_TAG = "trained_parts"  # the sub-folders training exported, registered together (adapter,motion_adapter)
BASE_DESCRIPTORS = ("weights.json", "motioncharacter.json")  # what says where a base's parts came from
TRIES, BACKOFF = 4, 1.0  # registry calls at the end of training: a short outage is waited out


class RegistryError(UserError):
    """A registry reference cannot be resolved, or the registry refused a call."""


def default_model_name() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def is_reference(value: str | None) -> bool:
    return bool(value) and str(value).startswith(PREFIX)


@dataclass(frozen=True)
class Reference:
    name: str
    version: int | None = None   # models:/NAME/3
    alias: str | None = None     # models:/NAME@champion
    latest: bool = False         # models:/NAME/latest

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}" + (f"@{self.alias}" if self.alias else "/latest" if self.latest
                                          else f"/{self.version}")


_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+|latest))$")


def parse_reference(ref: str) -> Reference:
    """``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``models:/NAME/latest``."""
    m = _REF.match(ref.strip())
    if not m:
        raise RegistryError(f"{ref!r} is not a registry reference: use models:/NAME/VERSION, models:/NAME@ALIAS "
                            f"or models:/NAME/latest, e.g. models:/{DEFAULT_MODEL}@{CHAMPION}")
    v = m["version"]
    return Reference(m["name"], version=int(v) if v and v.isdigit() else None, alias=m["alias"], latest=v == "latest")


@dataclass
class ModelVersion:
    """One registered version: its source (the adapter's URI) and tags."""
    name: str
    version: int
    source: str
    run_id: str = ""
    tags: dict = field(default_factory=dict)
    aliases: list = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"{PREFIX}{self.name}/{self.version}"

    @classmethod
    def of(cls, mv) -> "ModelVersion":
        return cls(mv.name, int(mv.version), mv.source, mv.run_id or "", dict(mv.tags or {}), list(mv.aliases or []))


def client():
    """An MlflowClient on the current tracking URI (a down server fails fast, with the fix)."""
    from mlflow.tracking import MlflowClient

    from . import tracking

    uri = tracking.tracking_uri()
    tracking.check_server(uri)
    return MlflowClient(uri)


def _retrying(what: str, fn: Callable):
    """``fn()``, tried again with backoff while the server is unreachable (tracking.Guard's rule
    of what is transient); a refusal, or an outage that outlasts the tries, is a RegistryError."""
    from . import tracking

    for attempt in range(TRIES):
        try:
            return fn()
        except Exception as e:
            if not (isinstance(e, tracking.TrackingError) or tracking._transient(e)) or attempt == TRIES - 1:
                raise RegistryError(f"MLflow Model Registry: {what} failed ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e
            log.warning("MLflow Model Registry: %s failed (%s); trying again", what, str(e)[:200])
            time.sleep(BACKOFF * 2 ** attempt)


# ---- registration ----------------------------------------------------------------------------

def base_lineage(weights: str | None, preset: str | None) -> dict[str, str]:
    """The base a run trained on: its URI (or ``preset:NAME``) and the SHA-256 of the file that
    describes its parts (weights.json, else motioncharacter.json) when it has one."""
    if preset:
        return {BASE_TAG: f"preset:{preset}"}
    tags = {BASE_TAG: str(weights)}
    for name in BASE_DESCRIPTORS:
        uri = storage.join(weights, name)
        if storage.exists(uri):
            tags[BASE_HASH_TAG] = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
            tags["lineage.base_weights_descriptor"] = name
            break
    return tags


def _source(adapter_uri: str, run_id: str, c, parts: list[str]) -> str:
    """What the version's source is: the s3:// URI as it is; a local folder as the absolute path
    for an embedded store, or (a tracking server refuses local paths, which other machines could
    not read anyway) as a copy in the training run's artifacts, with its sibling ``parts``."""
    if storage.is_s3(adapter_uri):
        return adapter_uri
    local = Path(adapter_uri).resolve()
    if not c.tracking_uri.startswith(("http://", "https://")):
        return str(local)
    for part in parts:
        d = str(local.parent / part)
        _retrying(f"uploading {d} to run {run_id}", lambda: c.log_artifacts(run_id, d, part))
    root = _retrying(f"reading run {run_id}", lambda: c.get_run(run_id)).info.artifact_uri.rstrip("/")
    return f"{root}/{local.name}"


def register_adapter(adapter_uri: str, *, train_run_id: str, lineage: dict[str, str], name: str | None = None,
                     extra_tags: dict[str, str] | None = None, parts: list[str] | None = None,
                     c=None) -> ModelVersion:
    """Register ``adapter_uri`` (the trained adapter/, face_adapter/ or content_guider/ folder) as a
    new version of ``name`` (created when missing), with ``lineage`` and ``extra_tags`` as version
    tags. ``parts``: every sub-folder training exported next to it (default: that folder alone), e.g.
    motion_adapter/ as well; they travel with the version. A repeated call for the same training run
    and adapter (a retried pipeline step) returns the version it made before."""
    from mlflow.exceptions import MlflowException

    c = c or _retrying("reaching the tracking server", client)
    name = name or default_model_name()
    parts = parts or [adapter_uri.rstrip("/").rsplit("/", 1)[-1]]
    tags = {RUN_TAG: train_run_id, PARTS_TAG: ",".join(parts), **{k: str(v) for k, v in lineage.items()},
            **(extra_tags or {})}
    source = _source(adapter_uri, train_run_id, c, parts) if train_run_id else adapter_uri

    def ensure_model():
        try:
            c.create_registered_model(name, description="MotionCharacter adapters: one version per training run")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    _retrying(f"creating registered model {name!r}", ensure_model)
    earlier = _retrying(f"searching {name!r}", lambda: c.search_model_versions(
        f"name='{name}' and run_id='{train_run_id}'")) if train_run_id else []
    for mv in earlier:
        if mv.source == source:
            log.info("adapter %s is already %s/%s", adapter_uri, name, mv.version)
            break
    else:
        mv = _retrying(f"registering {source} as a version of {name!r}",
                       lambda: c.create_model_version(name, source, run_id=train_run_id or None, tags=tags))
    version = ModelVersion.of(mv)
    _write_marker(adapter_uri, version)
    return version


def _write_marker(adapter_uri: str, v: ModelVersion) -> None:
    data = json.dumps({"name": v.name, "version": v.version, "uri": v.uri, "source": v.source}).encode()
    storage.write_bytes(storage.join(adapter_uri, MARKER), data)


def registered_version_of(weights: str | None) -> dict | None:
    """The marker (name, version, uri, source) when ``weights`` (a folder or URI) holds a registered adapter."""
    if not weights or is_reference(weights):
        return None
    from .model.trained import PRIMARY_PARTS

    for part in PRIMARY_PARTS:
        uri = storage.join(weights, part, MARKER)
        try:
            if storage.exists(uri):
                return json.loads(storage.read_bytes(uri))
        except (OSError, ValueError, storage.StorageError):
            return None
    return None


# ---- resolution -------------------------------------------------------------------------------

def resolve(ref: str, c=None) -> ModelVersion:
    """The version a reference names; a missing model, version or alias is a RegistryError naming it."""
    from mlflow.exceptions import MlflowException

    r = parse_reference(ref)
    c = c or client()
    try:
        if r.alias:
            mv = c.get_model_version_by_alias(r.name, r.alias)
        elif r.latest:
            versions = c.search_model_versions(f"name='{r.name}'")
            if not versions:
                raise RegistryError(f"registered model {r.name!r} has no versions ({ref})")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = c.get_model_version(r.name, str(r.version))
    except MlflowException as e:
        raise RegistryError(_not_found(r, c, e)) from None
    return ModelVersion.of(mv)


def _not_found(r: Reference, c, e) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(r.name)
    except MlflowException:
        return f"no registered model {r.name!r} on {c.tracking_uri} (from {r})"
    if r.alias:
        known = ", ".join(f"@{a} -> {v}" for a, v in sorted((model.aliases or {}).items())) or "none"
        return f"registered model {r.name!r} has no alias {r.alias!r} (its aliases: {known})"
    return f"registered model {r.name!r} has no version {r.version} ({str(e).splitlines()[0][:160]})"


def _parts(v: ModelVersion) -> list[str]:
    return [p for p in v.tags.get(PARTS_TAG, "").split(",") if p] or [v.source.rstrip("/").rsplit("/", 1)[-1]]


def adapter_dir(v: ModelVersion) -> Path:
    """The version's adapter (or face adapter / Content Guider) files as a local folder."""
    return parts_dir(v) / v.source.rstrip("/").rsplit("/", 1)[-1]


def parts_dir(v: ModelVersion) -> Path:
    """A local folder holding every part the version registered (``trained_parts``), each in its
    sub-folder (downloaded once into the cache)."""
    primary = v.source.rstrip("/").rsplit("/", 1)[-1]
    if v.source.startswith("file:") or not re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", v.source):  # a local path
        p = Path(re.sub(r"^file:(//)?", "", v.source))
        if not p.is_dir():
            raise RegistryError(f"{v.uri}: its adapter {v.source} is not on this machine")
        return p.parent
    dest = storage.cache_dir() / "registry" / _key(v) / "parts"
    if (dest / primary / "config.json").is_file():
        return dest
    tmp = dest.with_name("parts.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = v.source.rstrip("/").rsplit("/", 1)[0]
    for part in _parts(v):
        uri = f"{root}/{part}"
        if storage.is_s3(uri):
            storage.download_dir(uri, tmp / part)
        else:
            import mlflow.artifacts

            got = _retrying(f"downloading {uri}", lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp)))
            if Path(got) != tmp / part:
                Path(got).rename(tmp / part)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _key(v: ModelVersion) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', v.name)}-v{v.version}-{hashlib.sha256(v.source.encode()).hexdigest()[:12]}"


def weights_for(v: ModelVersion) -> tuple[str, bool]:
    """(a full weights URI for the version, whether it was assembled on this machine).

    The weights folder its evaluation scored (tag ``weights``) when there is one; otherwise its
    base (``lineage.base_weights``) with every part the run trained (``trained_parts``: the adapter,
    face adapter or Content Guider, and motion_adapter/ when the motion modules were trained) laid
    over it, into a local folder (``model.trained.assemble``, as the pipeline does)."""
    from .model.trained import PRIMARY_PARTS, assemble

    scored = v.tags.get(WEIGHTS_TAG)
    if scored and any(storage.exists(storage.join(scored, p, "config.json")) for p in PRIMARY_PARTS):
        return scored, False
    base = v.tags.get(BASE_TAG, "")
    if not base or base == "unknown":
        raise RegistryError(f"{v.uri} records no base weights ({BASE_TAG}), so its adapter cannot be assembled into "
                            "a weights folder")
    parts = parts_dir(v)
    digest = hashlib.sha256(base.encode())
    files = (f for part in _parts(v) for f in (parts / part).rglob("*"))  # not the run's checkpoints beside them
    for f in sorted(f for f in files if f.is_file() and f.name != MARKER):
        digest.update(f.relative_to(parts).as_posix().encode() + f.read_bytes())
    # keyed by content: another store's version 1 at the same URI is other weights
    dest = storage.cache_dir() / "registry" / f"{_key(v)}-{digest.hexdigest()[:16]}" / "weights"
    if dest.is_dir():  # renamed into place only once complete
        return str(dest), True
    tmp = dest.with_name("weights.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    preset = base.removeprefix("preset:") if base.startswith("preset:") else ""
    if preset == "mini":
        from .model.presets import mini_weights

        preset, base = "", mini_weights()
    assemble(str(parts), preset, base, str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log.info("assembled %s (base %s + %s) in %s", v.uri, base, ", ".join(_parts(v)), dest)
    return str(dest), True


# ---- evaluation link, aliases, the comparison rule -------------------------------------------

def link_evaluation(name: str, version: int, eval_run_id: str, metrics: dict, weights: str | None = None,
                    c=None) -> None:
    """Tag the version with the evaluation that scored it (run id, metric values, the weights folder)."""
    c = c or client()
    tags = {EVAL_RUN_TAG: eval_run_id}
    values = {k: v.get("value") if isinstance(v, dict) else v for k, v in metrics.items()}
    tags.update({f"eval.{k}": f"{float(x):.6g}" for k, x in values.items()
                 if isinstance(x, (int, float)) and not isinstance(x, bool)})
    if weights and not is_reference(weights):
        tags[WEIGHTS_TAG] = weights if storage.is_s3(weights) else str(Path(weights).resolve())
    for k, val in tags.items():
        _retrying(f"tagging {name}/{version} with {k}", lambda k=k, val=val: c.set_model_version_tag(name, str(version), k, val))
    _retrying(f"tagging run {eval_run_id}", lambda: c.set_tag(eval_run_id, "registered_model", f"{PREFIX}{name}/{version}"))


def set_alias(name: str, version: int, alias: str, c=None) -> None:
    c = c or client()
    _retrying(f"setting alias @{alias} of {name!r} to version {version}",
              lambda: c.set_registered_model_alias(name, alias, str(version)))
    log.info("%s@%s -> version %s", name, alias, version)


def promote(ref: str, alias: str = CHAMPION, c=None) -> ModelVersion:
    """Point ``alias`` of the reference's model at the version it names."""
    c = c or client()
    v = resolve(ref, c)
    set_alias(v.name, v.version, alias, c)
    return resolve(f"{PREFIX}{v.name}/{v.version}", c)


@dataclass(frozen=True)
class ChampionRule:
    """When a challenger becomes champion: its ``metric`` beats the champion's (higher is better,
    or lower with ``lower``); with no champion yet it wins. ``metric=""``: only on request."""
    metric: str = ""
    lower: bool = False

    @classmethod
    def parse(cls, spec: str, thresholds: dict | None = None) -> "ChampionRule":
        """``""``/``manual``: never automatic; ``auto``: the gate's first metric (lower is better when
        its threshold is only a maximum); ``METRIC`` or ``METRIC:lower`` / ``METRIC:higher``."""
        spec = (spec or "").strip()
        if spec in ("", "manual"):
            return cls()
        if spec == "auto":
            if not thresholds:
                raise ValueError("champion rule 'auto' compares on the gate's first metric, but there are no thresholds")
            metric, bound = next(iter(thresholds.items()))
            only_max = isinstance(bound, dict) and bound.get("max") is not None and bound.get("min") is None
            return cls(metric, lower=only_max)
        metric, _, way = spec.partition(":")
        if way not in ("", "higher", "lower") or not metric:
            raise ValueError(f"champion rule {spec!r} is not '', 'manual', 'auto', METRIC, METRIC:higher or METRIC:lower")
        return cls(metric, lower=way == "lower")

    def beats(self, challenger: float | None, champion: float | None) -> bool:
        if challenger is None:
            return False
        if champion is None:
            return True
        return challenger < champion if self.lower else challenger > champion


def _metric_of(v: ModelVersion, metric: str) -> float | None:
    try:
        return float(v.tags[f"eval.{metric}"])
    except (KeyError, ValueError):
        return None


def gate_passed(name: str, version: int, rule: ChampionRule, c=None) -> str:
    """The quality gate passed for this version: alias challenger, then champion when the rule
    says so. Returns one line saying what was decided."""
    from mlflow.exceptions import MlflowException

    c = c or client()
    set_alias(name, version, CHALLENGER, c)
    said = f"{name}/{version} is @{CHALLENGER}"
    if not rule.metric:
        return said + f"; promote it with `motioncharacter registry promote {PREFIX}{name}/{version}`"
    mine = _metric_of(resolve(f"{PREFIX}{name}/{version}", c), rule.metric)
    try:
        champ = ModelVersion.of(c.get_model_version_by_alias(name, CHAMPION))
    except MlflowException:
        champ = None
    if champ and champ.version == version:
        return said + f" and already @{CHAMPION}"
    theirs = _metric_of(champ, rule.metric) if champ else None
    if rule.beats(mine, theirs):
        set_alias(name, version, CHAMPION, c)
        return said + (f" and now @{CHAMPION}: {rule.metric} {mine:.4g} beats version {champ.version}'s {theirs}"
                       if champ else f" and @{CHAMPION} (there was none)")
    return said + (f"; @{CHAMPION} stays version {champ.version} ({rule.metric} {mine} does not beat {theirs})"
                   if champ else f"; no @{CHAMPION}: {rule.metric} was not measured")


def versions(name: str, c=None) -> list[ModelVersion]:
    """Every version of ``name``, newest first."""
    c = c or client()
    out = sorted((ModelVersion.of(mv) for mv in c.search_model_versions(f"name='{name}'")), key=lambda v: -v.version)
    if out:  # a search returns versions without their aliases; the model has them
        aliases = c.get_registered_model(name).aliases or {}
        for v in out:
            v.aliases = sorted(a for a, n in aliases.items() if int(n) == v.version)
    return out


def describe(name: str | None = None, c=None) -> str:
    """One line: how many versions ``name`` has and where its aliases point."""
    c = c or client()
    name = name or default_model_name()
    vs = versions(name, c)
    aliases = ", ".join(f"@{a} -> {v.version}" for v in vs for a in sorted(v.aliases)) or "no aliases"
    return f"registered model {name!r}: {len(vs)} version(s), {aliases} (`motioncharacter registry list {name}`)"


def eval_run_of(ref: str, c=None) -> str:
    """The MLflow run that evaluated the version a reference names (for compare)."""
    v = resolve(ref, c)
    if not v.tags.get(EVAL_RUN_TAG):
        raise RegistryError(f"{ref} ({v.uri}) has no evaluation linked yet: run `motioncharacter evaluate "
                            f"--weights {v.uri} ...` first")
    return v.tags[EVAL_RUN_TAG]
