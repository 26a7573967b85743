"""``motioncharacter registry list|show|promote``: the trained adapters in MLflow's Model Registry."""
from __future__ import annotations

import argparse

from .registry import CHAMPION, DEFAULT_MODEL, MODEL_ENV, PREFIX


def add_commands(sub) -> None:
    r = sub.add_parser(
        "registry", help="trained adapters in the MLflow Model Registry: list versions, show one, promote",
        description="Every `motioncharacter train` registers its adapter as a new version of a registered model "
        f"(default '{DEFAULT_MODEL}', or ${MODEL_ENV}) with its lineage as tags; the pipeline's quality gate sets "
        "the alias 'challenger'. References: models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest "
        "(deploy --model, evaluate --weights and compare take them).")
    rsub = r.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    ls = rsub.add_parser("list", help="versions of a registered model, newest first, with aliases and lineage")
    ls.add_argument("name", nargs="?", help=f"registered model (default ${MODEL_ENV} or '{DEFAULT_MODEL}')")
    ls.set_defaults(func=_list)
    sh = rsub.add_parser("show", help="one version: source, aliases, every tag")
    sh.add_argument("reference", metavar="REF", help=f"e.g. {PREFIX}{DEFAULT_MODEL}@{CHAMPION} or {PREFIX}{DEFAULT_MODEL}/3")
    sh.set_defaults(func=_show)
    pr = rsub.add_parser("promote", help="point an alias (default champion) at a version",
                         description="Set ALIAS of model NAME to a version: `promote NAME 3`, `promote NAME @challenger` "
                         f"or `promote {PREFIX}NAME/3`. Deploys of {PREFIX}NAME@ALIAS then get that version.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("target", nargs="+", metavar="NAME VERSION|@ALIAS",
                    help="a model name and a version number or @alias, or one models:/ reference")
    pr.add_argument("--alias", default=CHAMPION, help="the alias to set")
    pr.set_defaults(func=_promote)


def _reference(words: list[str]) -> str:
    from .registry import RegistryError

    if len(words) == 1 and words[0].startswith(PREFIX):
        return words[0]
    if len(words) == 2:
        name, which = words
        return f"{PREFIX}{name}{which}" if which.startswith("@") else f"{PREFIX}{name}/{which}"
    raise RegistryError(f"promote takes NAME VERSION, NAME @ALIAS or one {PREFIX} reference, got {' '.join(words)!r}")


def _line(v) -> str:
    from .registry import BASE_TAG, COMMIT_TAG, EVAL_RUN_TAG, MANIFEST_TAG, RUN_TAG

    t = v.tags
    aliases = " ".join(f"@{a}" for a in sorted(v.aliases)) or "-"
    return (f"{v.version:>4}  {aliases:<22} train run {t.get(RUN_TAG, '-')[:12]:<12}  eval run "
            f"{t.get(EVAL_RUN_TAG, '-')[:12]:<12}  data {t.get(MANIFEST_TAG, '-')[:12]:<12}  commit "
            f"{t.get(COMMIT_TAG, '-')[:10]:<10}  base {t.get(BASE_TAG, '-')}\n      source {v.source}")


def _list(args) -> int:
    from .registry import RegistryError, default_model_name, versions

    name = args.name or default_model_name()
    vs = versions(name)
    if not vs:
        raise RegistryError(f"registered model {name!r} has no versions yet (`motioncharacter train` registers one)")
    print(f"{name}: {len(vs)} version(s)")
    print("   v  aliases                lineage")
    for v in vs:
        print(_line(v))
    return 0


def _show(args) -> int:
    from .registry import resolve

    v = resolve(args.reference)
    print(f"{v.uri}  (from {args.reference})")
    print(f"source   {v.source}")
    print(f"aliases  {' '.join('@' + a for a in sorted(v.aliases)) or '-'}")
    for k in sorted(v.tags):
        print(f"{k:<32} {v.tags[k]}")
    return 0


def _promote(args) -> int:
    from .registry import promote

    v = promote(_reference(args.target), alias=args.alias)
    print(f"{PREFIX}{v.name}@{args.alias} -> version {v.version} ({v.source})")
    return 0
