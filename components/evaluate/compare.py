"""``motioncharacter compare RUN_ID|models:/REF...``: evaluation runs side by side in the layout of Table 1.

Columns follow the paper (Dover Score, Motion Smoothness, Dynamic Degree, CLIP-I, CLIP-T, Face
Similarity) plus our intensity adherence. A cell names its metric variant when it is not the
paper's (e.g. ``[flowinterp]``, ``[sface]``); an absent metric shows ``n/a`` with the run's
recorded reason in a footnote. Best and second best of comparable cells are bold / underlined.
"""
from __future__ import annotations

import csv
from pathlib import Path

# (column, metric keys in preference order: the paper's definition first, stand-ins after)
COLUMNS = [
    ("Dover Score", ["dover"]),
    ("Motion Smoothness", ["motion_smoothness", "motion_smoothness_flowinterp"]),
    ("Dynamic Degree", ["dynamic_degree", "dynamic_degree_dis"]),
    ("CLIP-I", ["clip_i"]),
    ("CLIP-T", ["clip_t"]),
    ("Face Similarity", ["face_sim_arcface", "face_sim_sface"]),
    ("Intensity rho (ours)", ["intensity_spearman"]),
]


def _cell(metrics: dict, tags: dict, keys: list[str]) -> dict:
    for k in keys:
        if k in metrics:
            return {"key": k, "value": metrics[k]}
    for k in keys:
        if f"absent.{k}" in tags:
            return {"key": k, "value": None, "reason": tags[f"absent.{k}"]}
    return {"key": keys[0], "value": None, "reason": "not logged on this run"}


def collect(run_ids: list[str], labels: list[str] | None = None) -> list[dict]:
    """[{run_id, label, cells: {column: cell}}] from the tracking server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from motioncharacter import registry, tracking
    from motioncharacter.cli import UserError

    uri = tracking.tracking_uri()
    tracking.check_server(uri)
    client = MlflowClient(uri)
    out = []
    for i, rid in enumerate(run_ids):
        ref = None
        if registry.is_reference(rid):  # a registered version: the evaluation linked to it
            ref, rid = rid, registry.eval_run_of(rid, client)
        try:
            run = client.get_run(rid)
        except MlflowException as e:
            raise UserError(f"MLflow run {rid} not found on {uri} ({str(e).splitlines()[0][:160]})") from None
        label = labels[i] if labels and i < len(labels) else (ref or run.info.run_name or rid[:8])
        cells = {col: _cell(run.data.metrics, run.data.tags, keys) for col, keys in COLUMNS}
        out.append({"run_id": rid, "label": label, "cells": cells})
    return out


def _text(cell: dict, paper_key: str) -> str:
    if cell["value"] is None:
        return "n/a"
    s = f"{cell['value']:.3f}"
    if cell["key"] != paper_key:
        s += f" [{cell['key'].rsplit('_', 1)[-1]}]"
    return s


def table(rows: list[dict]) -> tuple[str, list[str]]:
    """Markdown table (best bold, second underlined among cells with the same variant) + footnotes."""
    header = ["Method"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    marks: dict[tuple[int, str], str] = {}
    for col, keys in COLUMNS:
        present = [(r["cells"][col]["value"], i) for i, r in enumerate(rows) if r["cells"][col]["value"] is not None]
        variants = {rows[i]["cells"][col]["key"] for _, i in present}
        if len(present) >= 2 and len(variants) == 1:
            ranked = sorted(present, reverse=True)
            marks[(ranked[0][1], col)] = "**"
            if len(ranked) > 2:
                marks[(ranked[1][1], col)] = "<u>"
    notes = []
    for i, r in enumerate(rows):
        cells = []
        for col, keys in COLUMNS:
            c = r["cells"][col]
            t = _text(c, keys[0])
            if c["value"] is None:
                notes.append(f"{r['label']} / {col}: {c.get('reason', '')}")
                t += f" ({len(notes)})"
            m = marks.get((i, col))
            cells.append(f"**{t}**" if m == "**" else f"<u>{t}</u>" if m else t)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines), notes


def bar_plots(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(2.6 * len(COLUMNS), 3.2), dpi=100)
    labels = [r["label"] for r in rows]
    for ax, (col, _) in zip(axes, COLUMNS):
        vals = [r["cells"][col]["value"] for r in rows]
        ax.bar(range(len(rows)), [v if v is not None else 0 for v in vals], color=[f"C{i}" for i in range(len(rows))])
        for x, v in enumerate(vals):
            if v is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(col, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(run_ids: list[str], output: str, labels: list[str] | None = None) -> dict:
    """Print-ready table; writes compare.md, compare.csv and compare.png into ``output``."""
    import tempfile

    from motioncharacter import storage

    rows = collect(run_ids, labels)
    md, notes = table(rows)
    text = md + ("\n\n" + "\n".join(f"({i}) {n}" for i, n in enumerate(notes, 1)) if notes else "")
    text += ("\n\nBracketed names mark a stand-in for the paper's metric (see `motioncharacter evaluate --help`).")
    local = not storage.is_s3(output)
    out = Path(output) if local else Path(tempfile.mkdtemp(prefix="mc-compare-", dir=storage.cache_dir()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run_id", "label"] + [f"{c} ({r['cells'][c]['key']})" for c, _ in COLUMNS for r in rows[:1]])
        for r in rows:
            w.writerow([r["run_id"], r["label"]] + [r["cells"][c]["value"] if r["cells"][c]["value"] is not None
                                                   else "" for c, _ in COLUMNS])
    bar_plots(rows, out / "compare.png")
    if not local:
        storage.upload_dir(out, output)
    return {"rows": rows, "text": text, "output": output}
