"""``megaclass report RUN``: one report of a run directory, complete or not.

Why this module: it is the stage entry (``build_report``, called by the CLI and by
``megaclass run``) and the rendering of the report. Reading the run directory lives in
``report_read.py`` and the plots in ``report_plots.py``; this module turns their result into
the files below, so the three formats always show the same sections.

Writes ``RUN/report.json`` (one section per stage with ``status`` = complete | partial |
missing | unreadable | skipped — the last for embed/cluster/assign under bring-your-own labels),
``RUN/report.md``, ``RUN/report.html`` (self-contained: the PNG plots are embedded as base64
data URIs, no scripts, no external links) and ``RUN/plots/*.png``: k-means objective,
cluster-size distribution, training loss and learning rate, held-out Recall@1 / mAP@R during
training (the ``"kind": "eval"`` lines of ``RUN/train/metrics.jsonl``), Recall@K per encoder,
metric against feature dimension. A plot whose data is not there is listed as missing with the
reason instead. The eval section ends with *retrieval examples*: a few seeded held-out queries
with each encoder's top-5 neighbours from ``RUN/eval/features/*.npz``, right/wrong class marked
(green/red borders in HTML with thumbnails read from the eval shards, ✓/✗ in markdown). What is read from where: ``report_read.py``; the run directory: docs/architecture.md.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from megaclass.core.atomic import write_json_atomic, write_text_atomic
from megaclass.core.rundir import STAGES, RunDir
from megaclass.pipelines.report_plots import PLOT_TITLES, STAGE_PLOTS, write_plots
from megaclass.pipelines.report_read import read_run, recall_ks


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 120 else s[:117] + "…"
    return str(v)


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


SCALARS = {
    "config": [],
    "embed": [
        ("rows", "rows embedded"),
        ("seen", "samples read"),
        ("skipped_total", "samples skipped"),
        ("shards", "shards"),
        ("shards_done", "shards done"),
        ("shards_failed", "shards failed"),
        ("samples_per_s", "samples/s"),
        ("wall_s", "wall time (s)"),
        ("image_teacher", "image teacher"),
        ("text_teacher", "text teacher"),
        ("image_dim", "image dim"),
        ("text_dim", "text dim"),
        ("bring_your_own", "bring-your-own embeddings"),
    ],
    "cluster": [
        ("k", "k"),
        ("backend", "backend"),
        ("feature", "feature"),
        ("dim", "dim"),
        ("sample_rows", "sample rows"),
        ("total_rows", "total rows"),
        ("iterations", "iterations"),
        ("final_mean_cosine", "mean cosine to centroid"),
        ("seconds_kmeans", "k-means time (s)"),
        ("points_per_s", "point-iterations/s"),
    ],
    "assign": [
        ("rows", "rows labelled"),
        ("shards_done", "shards done"),
        ("k", "k"),
        ("topk", "labels per sample"),
        ("method", "method"),
        ("low_score_share", "low-score share"),
        ("low_score_threshold", "low-score threshold"),
        ("rows_per_second", "rows/s"),
    ],
    "train": [
        ("steps", "steps"),
        ("final_loss", "final loss"),
        ("samples", "samples"),
        ("samples_per_s", "samples/s"),
        ("wall_s", "wall time (s)"),
        ("world_size", "ranks"),
        ("global_batch", "global batch"),
        ("bad_steps", "non-finite steps"),
        ("resumed_from", "resumed from step"),
    ],
    "eval": [("wall_s", "wall time (s)")],
}


def _kv_rows(sec: dict[str, Any], stage: str) -> list[tuple[str, str]]:
    rows = [(label, _fmt(sec[key])) for key, label in SCALARS.get(stage, []) if key in sec]
    if stage == "cluster":
        sz = sec.get("sizes") or {}
        for key, label in (
            ("empty", "empty clusters"),
            ("singleton", "singleton clusters"),
            ("imbalance", "imbalance factor"),
        ):
            if key in sz:
                rows.append((label, _fmt(sz[key])))
        q = sec.get("quality") or {}
        for key in ("nmi", "ami", "homogeneity", "completeness"):
            if q.get(key) is not None:
                rows.append(
                    (f"{key.upper() if len(key) == 3 else key} vs ground truth", _fmt(q[key]))
                )
    if stage == "assign":
        h = sec.get("label_histogram") or {}
        for key, label in (("empty", "classes without samples"), ("imbalance", "label imbalance")):
            if key in h:
                rows.append((label, _fmt(h[key])))
    if stage == "regroup":
        for key, label in (("parts", "label files read"), ("training_shards", "training shards")):
            if key in sec:
                rows.append((label, _fmt(sec[key])))
        for kind, n in (sec.get("mismatches") or {}).items():
            ex = ", ".join((sec.get("mismatch_examples") or {}).get(kind, []))
            rows.append((f"mismatch: {kind}", _fmt(n) + (f" (e.g. {ex})" if ex else "")))
    if stage == "train":
        m = sec.get("metrics") or {}
        for key, label in (
            ("last_step", "last logged step"),
            ("loss_first", "first logged loss"),
            ("loss_min", "lowest loss"),
            ("lr_max", "peak lr"),
            ("samples_per_s_mean", "mean samples/s (logged)"),
            ("data_wait_share_mean", "data-wait share"),
        ):
            if m.get(key) is not None:
                rows.append((label, _fmt(m[key])))
        if sec.get("checkpoints"):
            rows.append(("checkpoints", ", ".join(sec["checkpoints"][-3:])))
    if stage == "eval":
        es = sec.get("eval_set") or {}
        for key, label in (("n", "eval images"), ("classes", "classes")):
            if key in es:
                rows.append((label, _fmt(es[key])))
        read = es.get("read") or {}
        if read.get("skipped"):
            rows.append(
                ("eval samples skipped", ", ".join(f"{k}: {v}" for k, v in read["skipped"].items()))
            )
    return rows


def headline(stage: str, sec: dict[str, Any]) -> str:
    """One line per stage for the overview table (empty when the stage is not complete)."""
    if sec.get("status") != "complete":
        return ""
    g = sec.get
    if stage == "embed":
        return (
            f"{_fmt(g('rows'))} rows from {_fmt(g('shards'))} shards, "
            f"{_fmt(g('skipped_total'))} samples skipped, {_fmt(g('samples_per_s'))} samples/s"
        )
    if stage == "cluster":
        q = (g("quality") or {}).get("nmi")
        return (
            f"k={_fmt(g('k'))} ({g('backend')}), {g('iterations')} iterations, "
            f"imbalance {_fmt((g('sizes') or {}).get('imbalance'))}"
            + (f", NMI {_fmt(q)}" if q is not None else "")
        )
    if stage == "assign":
        share = g("low_score_share")
        return f"{_fmt(g('rows'))} rows, top-{g('topk')} ({g('method')})" + (
            f", {100 * share:.1f}% below score {g('low_score_threshold')}"
            if share is not None
            else ""
        )
    if stage == "regroup":
        if "rows_out" not in sec:
            return sec.get("note", "")
        bad = sum((sec.get("mismatches") or {}).values())
        return (
            f"{_fmt(g('rows_out'))} label rows into {_fmt(g('training_shards'))} shard sidecars, "
            f"{_fmt(bad)} mismatches counted"
        )
    if stage == "train":
        return (
            f"{_fmt(g('steps'))} steps, final loss {_fmt(g('final_loss'))}, "
            f"{_fmt(g('samples_per_s'))} samples/s on {_fmt(g('world_size'))} rank(s)"
        )
    if stage == "eval":
        parts = [
            f"{name} R@1 {_pct(r['full'].get('recall@1'))}%"
            if not r.get("probes")
            else f"{name} kNN {_pct(r['probes'].get('knn', {}).get('top1'))}%, "
            f"linear {_pct(r['probes'].get('linear', {}).get('top1'))}%"
            for name, r in (g("encoders") or {}).items()
        ]
        return ", ".join(parts)
    return ""


def eval_table(ev: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per encoder × feature size, metrics in %."""
    encs = ev.get("encoders") or {}
    if not encs:
        return [], []
    if any(r.get("probes") for r in encs.values()):
        return probe_table(encs)
    first = next(iter(encs.values()))["full"]
    ks = recall_ks(first)
    knn_k = first.get("knn_k")
    header = ["encoder", "dim"] + [f"R@{k}" for k in ks] + ["mAP@R", f"kNN@{knn_k}", "images/s"]
    keys = [f"recall@{k}" for k in ks] + ["map@r", "knn_acc"]
    rows = []
    for name, r in encs.items():
        rows.append(
            [name, str(r.get("dim"))]
            + [_pct(r["full"].get(k)) for k in keys]
            + [_fmt(r.get("images_per_s"))]
        )
        for d, m in sorted((r.get("compact") or {}).items(), key=lambda kv: int(kv[0])):
            rows.append([f"{name} (first {d})", d] + [_pct(m.get(k)) for k in keys] + [""])
    cmp_ = ev.get("comparison") or {}
    if cmp_.get("full"):
        rows.append(
            ["Δ student − teacher", "full"]
            + [
                "—" if cmp_["full"].get(k) is None else f"{100 * cmp_['full'][k]:+.1f}"
                for k in keys
            ]
            + [""]
        )
    return header, rows


def probe_table(encs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``eval.protocol=classification``: kNN and linear-probe top-1 in %."""
    header = ["encoder", "dim", "kNN top-1", "linear top-1", "λ", "images/s"]
    rows = []
    for name, r in encs.items():
        p = r.get("probes") or {}
        lin = p.get("linear") or {}
        rows.append(
            [
                name,
                str(r.get("dim")),
                _pct((p.get("knn") or {}).get("top1")),
                _pct(lin.get("top1")),
                "—" if lin.get("l2") is None else f"{lin['l2']:g}",
                _fmt(r.get("images_per_s")),
            ]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


STAGE_TITLES = {
    "config": "Run configuration",
    "embed": "Embed (teacher features)",
    "cluster": "Cluster (spherical k-means)",
    "assign": "Assign (pseudo-labels)",
    "regroup": "Regroup (labels per training shard)",
    "train": "Train (student)",
    "eval": "Eval (held-out classes)",
}


def _overview_note(sec: dict[str, Any]) -> str:
    return sec.get("note") or sec.get("error") or sec.get("headline") or ""


def render_md(report: dict[str, Any]) -> str:
    lines = [
        f"# megaclass report — `{report['run_dir']}`",
        "",
        f"Generated {report['generated_at']}.",
        "",
    ]
    lines.append(
        "**All stages complete.**"
        if not report["missing"]
        else "**Incomplete run — stages not complete: " + ", ".join(report["missing"]) + ".**"
    )
    lines += [
        "",
        *_md_table(
            ["stage", "status", "note"],
            [
                [
                    s,
                    report["stages"][s]["status"],
                    _overview_note(report["stages"][s]),
                ]
                for s in STAGES
            ],
        ),
        "",
    ]
    for stage in ("config", *STAGES):
        sec = report["stages"][stage] if stage in report["stages"] else report["config"]
        lines += [
            f"## {STAGE_TITLES[stage]}",
            "",
            f"Status: **{sec['status']}**" + (f" — {sec['note']}" if sec.get("note") else ""),
            "",
        ]
        if sec.get("error"):
            lines += [f"Error: `{sec['error']}`", ""]
        if sec.get("warning"):
            lines += [f"⚠ {sec['warning']}", ""]
        if stage == "config" and sec.get("key_settings"):
            lines += _md_table(
                ["setting", "value"], [[k, _fmt(v)] for k, v in sec["key_settings"].items()]
            ) + [""]
        kv = _kv_rows(sec, stage)
        if kv:
            lines += _md_table(["", "value"], [list(r) for r in kv]) + [""]
        if stage == "embed" and sec.get("skipped"):
            lines += ["Skipped samples by reason:", ""]
            lines += _md_table(
                ["reason", "samples"], [[k, str(v)] for k, v in sorted(sec["skipped"].items())]
            ) + [""]
        if stage == "embed" and sec.get("failed_shards"):
            lines += ["Failed shards:", ""]
            lines += _md_table(
                ["shard", "error"], [[k, str(v)] for k, v in sorted(sec["failed_shards"].items())]
            ) + [""]
        if stage == "eval":
            header, rows = eval_table(sec)
            if rows:
                lines += [
                    "Metrics in %, SOP protocol (every image a query, the rest the gallery; singleton classes excluded as queries):",
                    "",
                ]
                lines += _md_table(header, rows) + [""]
        for p in STAGE_PLOTS.get(stage, []):
            plot = report["plots"].get(p, {})
            if plot.get("file"):
                lines += [f"![{PLOT_TITLES[p]}]({plot['file']})", ""]
            else:
                lines += [
                    f"*{PLOT_TITLES[p]}: not available — {plot.get('missing', 'no data')}.*",
                    "",
                ]
        if stage == "eval" and report.get("retrieval_examples"):
            lines += examples_md(report["retrieval_examples"])
    return "\n".join(lines) + "\n"


def examples_md(ex: dict[str, Any]) -> list[str]:
    """The retrieval examples as markdown: per query, one row of neighbour keys per encoder."""
    title = "### Retrieval examples"
    if ex.get("status") != "complete":
        why = ex.get("note") or ex.get("error") or "not available"
        return [title, "", f"*Retrieval examples: not available — {why}.*", ""]
    encs = ex["encoders"]
    k = ex["k"]
    acc = ", ".join(f"{n} {100 * ex['accuracy'][n]:.0f}%" for n in encs)
    lines = [
        title,
        "",
        f"{len(ex['queries'])} held-out queries (seed {ex['seed']}), top-{k} neighbours by cosine "
        f"per encoder (the query itself excluded); ✓ same class as the query, ✗ another class. "
        f"Right: {acc}.",
        "",
    ]
    for q in ex["queries"]:
        lines += [f"Query **{q['key']}** (class {q['class']}):", ""]
        rows = [
            [n]
            + [f"{h['key']} {'✓' if h['correct'] else '✗'}" for h in q["neighbours"][n]]
            + [""] * (k - len(q["neighbours"][n]))
            for n in encs
        ]
        lines += _md_table(["encoder", *map(str, range(1, k + 1))], rows) + [""]
    return lines


def examples_html(ex: dict[str, Any], thumbs: dict[str, bytes]) -> str:
    """The retrieval examples as HTML: query, then each encoder's neighbours side by side,
    green border = same class as the query, red = another class."""
    e = html.escape
    if ex.get("status") != "complete":
        why = ex.get("note") or ex.get("error") or "not available"
        return f"<div class='full'><p class='na'>Retrieval examples: not available — {e(why)}.</p></div>"

    def card(key: str, cls: str, css: str, extra: str = "") -> str:
        data = thumbs.get(key)
        img = (
            f"<img alt='{e(key)}' src='data:image/jpeg;base64,{base64.b64encode(data).decode()}'>"
            if data
            else "<div class='noimg'>no image</div>"
        )
        return f"<div class='ex {css}' title='{e(key)} ({e(cls)})'>{img}<span>{e(key)}{extra}</span></div>"

    encs = ex["encoders"]
    head = "".join(
        f"<th>{e(n)} top-{ex['k']} ({100 * ex['accuracy'][n]:.0f}% right)</th>" for n in encs
    )
    rows = []
    for q in ex["queries"]:
        cls_line = "<br>class " + e(q["class"])
        cells = [f"<td>{card(q['key'], q['class'], 'q', cls_line)}</td>"]
        for n in encs:
            hits = "".join(
                card(h["key"], h["class"], "right" if h["correct"] else "wrong")
                for h in q["neighbours"][n]
            )
            cells.append(f"<td><div class='exrow'>{hits}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        f"<p class='na'>Thumbnails: {e(ex['thumbnails_note'])}.</p>"
        if ex.get("thumbnails_note")
        else ""
    )
    return (
        "<div class='full'><h3 id='retrieval-examples'>Retrieval examples</h3>"
        f"<p>{len(ex['queries'])} held-out queries (seed {ex['seed']}); each encoder's top-{ex['k']} "
        "neighbours by cosine, the query excluded. <span class='okc'>Green</span>: same class as "
        "the query; <span class='badc'>red</span>: another class.</p>"
        f"{note}<table class='extable'><thead><tr><th>query</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1040px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:0.2em 0 0.1em}h2{font-size:1.25em;margin:1.6em 0 0.5em;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5a6375;margin-bottom:14px}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff;font-size:0.92em}
th,td{border:1px solid #d8dce3;padding:4px 10px;text-align:left}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:0.85em;font-weight:600}
.complete{background:#d9f2e1;color:#17663a}.partial{background:#fff1c9;color:#7a5a00}
.missing,.skipped{background:#f1f2f4;color:#5a6375}.unreadable{background:#fbdada;color:#8a1c1c}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0}.ok{background:#d9f2e1}.warn{background:#fff1c9}
figure{margin:8px 0 14px;background:#fff;border:1px solid #d8dce3;padding:8px;display:inline-block}
figure img{max-width:100%;display:block}figcaption{color:#5a6375;font-size:0.88em;margin-top:4px}
.na{color:#7a8192;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:0 22px;align-items:flex-start}.full{flex-basis:100%}
.extable td{vertical-align:top;padding:6px}.exrow{display:flex;gap:5px}
.ex{display:inline-block;width:76px;font-size:0.72em;text-align:center;word-break:break-all;border:3px solid #fff}
.ex img{width:70px;height:70px;object-fit:cover;display:block;margin:0 auto}
.noimg{width:70px;height:70px;background:#eef1f5;color:#7a8192;line-height:70px}
.ex.right{border-color:#2e9e4f}.ex.wrong{border-color:#d0342c}.ex.q{border-color:#3a6ee8}
.okc{color:#2e9e4f;font-weight:600}.badc{color:#d0342c;font-weight:600}
"""


def render_html(
    report: dict[str, Any], plot_dir: Path, thumbs: dict[str, bytes] | None = None
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>megaclass report — {e(report['run_dir'])}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>megaclass report</h1><div class='sub'>{e(report['run_dir'])} · generated {e(report['generated_at'])}</div>",
    ]
    if report["missing"]:
        out.append(
            f"<div class='banner warn'><b>Incomplete run.</b> Stages not complete: {e(', '.join(report['missing']))}.</div>"
        )
    else:
        out.append("<div class='banner ok'><b>All stages complete.</b></div>")

    def table(header: list[str], rows: list[list[str]], num_from: int = 1) -> str:
        h = "".join(f"<th>{e(c)}</th>" for c in header)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td{' class=num' if i >= num_from else ''}>{e(str(c))}</td>"
                for i, c in enumerate(r)
            )
            + "</tr>"
            for r in rows
        )
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    status_rows = "".join(
        f"<tr><td>{e(s)}</td><td><span class='badge {e(report['stages'][s]['status'])}'>{e(report['stages'][s]['status'])}</span></td>"
        f"<td>{e(_overview_note(report['stages'][s]))}</td></tr>"
        for s in STAGES
    )
    out.append(
        f"<table><thead><tr><th>stage</th><th>status</th><th>note</th></tr></thead><tbody>{status_rows}</tbody></table>"
    )
    for stage in ("config", *STAGES):
        sec = report["stages"][stage] if stage in report["stages"] else report["config"]
        out.append(
            f"<h2 id='{stage}'>{e(STAGE_TITLES[stage])} <span class='badge {e(sec['status'])}'>{e(sec['status'])}</span></h2>"
        )
        if sec.get("note"):
            out.append(f"<p>{e(sec['note'])}</p>")
        if sec.get("error"):
            out.append(f"<p class='banner warn'>{e(sec['error'])}</p>")
        if sec.get("warning"):
            out.append(f"<p class='banner warn'>{e(sec['warning'])}</p>")
        if stage == "config" and sec.get("key_settings"):
            out.append(
                table(
                    ["setting", "value"], [[k, _fmt(v)] for k, v in sec["key_settings"].items()], 99
                )
            )
        kv = _kv_rows(sec, stage)
        out.append("<div class='row'>")
        if kv:
            out.append(table(["", "value"], [list(r) for r in kv]))
        if stage == "embed" and sec.get("skipped"):
            out.append(
                table(
                    ["skipped: reason", "samples"],
                    [[k, str(v)] for k, v in sorted(sec["skipped"].items())],
                )
            )
        if stage == "embed" and sec.get("failed_shards"):
            out.append(
                table(
                    ["failed shard", "error"],
                    [[k, str(v)] for k, v in sorted(sec["failed_shards"].items())],
                    99,
                )
            )
        if stage == "eval":
            header, rows = eval_table(sec)
            if rows:
                out.append(
                    "<div class='full'><p>Metrics in %, SOP protocol: every image a query, the rest "
                    "the gallery; queries of single-member classes excluded.</p>"
                    + table(header, rows, 2)
                    + "</div>"
                )
        for p in STAGE_PLOTS.get(stage, []):
            plot = report["plots"].get(p, {})
            if plot.get("file"):
                data = base64.b64encode((plot_dir.parent / plot["file"]).read_bytes()).decode()
                out.append(
                    f"<figure><img alt='{e(PLOT_TITLES[p])}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(PLOT_TITLES[p])}</figcaption></figure>"
                )
            else:
                out.append(
                    f"<p class='na'>{e(PLOT_TITLES[p])}: not available — {e(plot.get('missing', 'no data'))}.</p>"
                )
        if stage == "eval" and report.get("retrieval_examples"):
            out.append(examples_html(report["retrieval_examples"], thumbs or {}))
        out.append("</div>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Read every stage's files under ``run_dir``, write report.json/.md/.html and plots/."""
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise FileNotFoundError(f"{rd.root}: run directory not found")
    run = read_run(rd)
    report = run.report
    for name, sec in report["stages"].items():
        sec["headline"] = headline(name, sec)
    report["plots"] = write_plots(rd, run)
    write_json_atomic(rd.root / "report.json", report)
    write_text_atomic(rd.root / "report.md", render_md(report))
    write_text_atomic(rd.root / "report.html", render_html(report, rd.plots, run.thumbs))
    msg = (
        "all stages complete"
        if not report["missing"]
        else "missing: " + ", ".join(report["missing"])
    )
    print(f"report: {rd.root / 'report.html'} ({msg})")
    return report
