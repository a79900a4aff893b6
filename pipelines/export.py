"""``megaclass export RUN [--step N] [--out DIR] [--push REPO_ID] [--dataset ID …]``.

Exports a training checkpoint — the newest complete one, or step ``N`` — into the export
folder (``RUN/export`` unless ``--out``), in the layout the train stage writes at its end
(:mod:`megaclass.training.export`): our own files, open_clip's hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with
``open_clip.create_model_and_transforms("local-dir:DIR")``) and a model card, ``README.md``,
with the hub's metadata front matter and, once ``RUN/eval/metrics.json`` exists, the run's
eval table. ``--push ORG/NAME`` then uploads the folder to the Hugging Face hub, after which
``"hf-hub:ORG/NAME"`` loads it.

Why a command of its own: the train stage exports only its final step, before eval has run.
Re-exporting after eval puts the eval table into the card; exporting an earlier step serves
a checkpoint that evaluated better, or an unfinished run. With ``train.wandb_project`` set, the
eval table also goes to the training's W&B run (:func:`megaclass.training.tracking.log_eval_table`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megaclass.core.config import ConfigError
from megaclass.core.rundir import RunDir

SHARD_DATASET_RE = re.compile(r"(?:hf://datasets/|huggingface\.co/datasets/)([\w.-]+/[\w.-]+)")
"""A Hugging Face dataset id inside a shard URL (``hf://datasets/ORG/NAME/…`` or
``https://huggingface.co/datasets/ORG/NAME/resolve/…``), for the card's ``datasets``."""


log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The run directory has nothing to export as asked; the message says what and where."""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 with one message on bad input)."""
    ap = argparse.ArgumentParser(
        prog="megaclass export",
        description="Export a training checkpoint in open_clip's hub layout (loadable with "
        "open_clip's 'local-dir:' and, once pushed, 'hf-hub:'), with a model card.",
    )
    ap.add_argument("run_dir", help="run directory (holds train/ckpt)")
    ap.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: newest complete)"
    )
    ap.add_argument("--out", default=None, help="export folder (default: RUN/export)")
    ap.add_argument(
        "--push",
        metavar="REPO_ID",
        default=None,
        help="then upload the folder to this Hugging Face hub model repo (ORG/NAME)",
    )
    ap.add_argument(
        "--private", action="store_true", help="with --push: create the repo as private"
    )
    ap.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="ID",
        help="hub dataset id for the card's metadata (repeatable; hf:// shard URLs are "
        "recognised on their own)",
    )
    args = ap.parse_args(argv)
    try:
        paths = export_run_dir(
            args.run_dir, args.step, args.out, datasets=args.dataset, repo_id=args.push
        )
        if args.push:
            paths["pushed"] = push_folder(Path(paths["folder"]), args.push, args.private)
    except (ExportError, ConfigError) as e:
        print(f"megaclass export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=2))
    return 0


def export_run_dir(
    run_dir: str | Path,
    step: int | None = None,
    out: str | Path | None = None,
    datasets: Iterable[str] = (),
    repo_id: str | None = None,
) -> dict[str, str]:
    """Export checkpoint ``step`` (default: the newest complete one) of ``run_dir``.

    Returns the written paths (as :func:`~megaclass.training.export.export_encoder`) plus
    ``folder`` and ``checkpoint``.
    """
    from megaclass.pipelines.config import dump_config, load_config
    from megaclass.training.checkpoint import read_marker
    from megaclass.training.export import export_encoder

    rd = RunDir(run_dir)
    folder = pick_checkpoint(rd, step)
    marker = read_marker(folder)
    model, objective = load_student(folder, marker)
    cfg = load_config(rd.config_path) if rd.config_path.is_file() else None

    training: dict[str, Any] = {
        "checkpoint": folder.name,
        "step": int(marker["step"]),
        "world_size": marker.get("world_size"),
        "objective": objective,
    }
    final = rd.read_success("train")
    if final and final.get("steps") == marker["step"]:  # the finished run's own summary
        training.update({k: v for k, v in final.items() if k != "export"})
    card: dict[str, Any] = {"training": training, "objective": objective, "repo_id": repo_id}
    ids = list(datasets)
    if cfg is not None:
        card["data"] = {"shards": cfg.data.shards}
        card["config"] = dump_config(cfg)
        ids += hub_dataset_ids(cfg.data.shards)
    card["datasets"] = list(dict.fromkeys(ids))  # unique, in order

    eval_summary = read_eval(rd)
    columns: list[str] = []
    rows: list[list[Any]] = []
    if eval_summary is not None:
        columns, rows = eval_rows(eval_summary)
        card["eval"] = eval_summary
        card["eval_table"] = eval_markdown(eval_summary, columns, rows, folder.name)

    dest = Path(out) if out is not None else rd.export
    paths = export_encoder(model, dest, card, seed=cfg.seed if cfg is not None else 0)
    result = {"folder": str(dest), "checkpoint": str(folder), **paths}
    if eval_summary is not None and cfg is not None and cfg.train.wandb_project is not None:
        from megaclass.training.tracking import log_eval_table

        try:
            log_eval_table(rd.train, cfg.train, columns, rows, eval_headline(eval_summary))
            result["wandb_eval_table"] = "logged"
        except Exception as e:  # an optional side channel must not fail a finished export
            log.warning("export: eval table not logged to W&B: %s", e)
            result["wandb_eval_table"] = f"not logged: {e}"
    return result


def pick_checkpoint(rd: RunDir, step: int | None) -> Path:
    """The complete checkpoint folder to export; ExportError naming what exists otherwise."""
    from megaclass.training.checkpoint import MARKER, list_checkpoints, step_tag

    complete = list_checkpoints(rd.ckpt)
    if step is None:
        if not complete:
            raise ExportError(
                f"{rd.ckpt}: no complete checkpoint to export "
                f"(is {rd.root} a run directory that has trained?)"
            )
        return complete[-1][1]
    for s, folder in complete:
        if s == step:
            return folder
    have = ", ".join(str(s) for s, _ in complete) or "none"
    folder = rd.ckpt / step_tag(step)
    why = (
        f"{folder.name} is incomplete (no {MARKER}: its save was interrupted)"
        if folder.is_dir()
        else f"no checkpoint of step {step}"
    )
    raise ExportError(f"{rd.ckpt}: {why}; complete checkpoints: {have}")


def load_student(folder: Path, marker: dict[str, Any]) -> tuple[Any, str]:
    """(StudentModel with the checkpoint's weights, in eval mode; its objective).

    The architecture comes from the checkpoint's own marker (not the current config file), and
    the model is built as the trainer built it — same backbone, init, text tower — so that the
    export's untrained parts (a pfc run's text tower) match a train-time export.
    """
    import torch
    from megaclass.training.config import TrainConfig
    from megaclass.training.encoders import EncoderSpec, build_student

    spec = EncoderSpec.from_dict(marker["encoder_spec"])
    objective = marker.get("objective") or ("siglip" if spec.with_text else "pfc")
    tc = TrainConfig(
        objective=objective,
        model=spec.model,
        pretrained=spec.pretrained,
        embed_dim=spec.embed_dim,
    )
    model = build_student(tc, image_size=spec.image_size)
    states = folder / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportError(f"{folder}: {states.name} is missing (not a megaclass checkpoint?)")
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    missing, unexpected = model.load_state_dict(module, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{states}: weights do not match the architecture in {folder.name}/COMPLETE.json "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.float().eval(), objective


def hub_dataset_ids(shards: str | list[str] | None) -> list[str]:
    """Hugging Face dataset ids named by the shard URLs (none for local paths)."""
    urls = [shards] if isinstance(shards, str) else list(shards or [])
    return list(dict.fromkeys(m.group(1) for u in urls for m in SHARD_DATASET_RE.finditer(u)))


# --------------------------------------------------------------------------------------
# the eval table
# --------------------------------------------------------------------------------------


def read_eval(rd: RunDir) -> dict[str, Any] | None:
    """RUN/eval/metrics.json when it holds evaluated encoders; None otherwise."""
    path = rd.eval / "metrics.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e}); re-run `megaclass eval`") from e
    if not isinstance(summary, dict) or summary.get("skipped") or not summary.get("encoders"):
        return None
    return summary


def _encoder_order(summary: dict[str, Any]) -> list[str]:
    found = summary["encoders"]
    order = [n for n in summary.get("encoder_order") or [] if n in found]
    return order + sorted(n for n in found if n not in order)


def eval_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the eval table: one row per encoder and feature size, metrics in %
    (rounded to 0.1; None where not computed). Shared by the card and the W&B table."""
    from megaclass.pipelines.eval import metric_rows

    order = _encoder_order(summary)
    if any(summary["encoders"][n].get("probes") for n in order):  # eval.protocol=classification
        rows = []
        for name in order:
            p = summary["encoders"][name].get("probes") or {}
            top1 = [(p.get(k) or {}).get("top1") for k in ("knn", "linear")]
            rows.append(
                [name, int(summary["encoders"][name]["dim"])]
                + [None if v is None else round(100 * v, 1) for v in top1]
            )
        return ["encoder", "dim", "kNN top-1", "linear top-1"], rows
    metrics = metric_rows(summary["encoders"][order[0]]["full"])
    columns = ["encoder", "dim"] + [label for label, _ in metrics]

    def pct(m: dict[str, Any]) -> list[float | None]:
        return [None if m.get(k) is None else round(100 * m[k], 1) for _, k in metrics]

    rows: list[list[Any]] = []
    for name in order:
        r = summary["encoders"][name]
        rows.append([name, int(r["dim"]), *pct(r["full"])])
        for d, m in sorted((r.get("compact") or {}).items(), key=lambda kv: int(kv[0])):
            if int(d) != int(r["dim"]):
                rows.append([name, int(d), *pct(m)])
    return columns, rows


def eval_markdown(
    summary: dict[str, Any], columns: list[str], rows: list[list[Any]], exported: str
) -> str:
    """The eval table as Markdown for the model card, with what it measured."""
    es = summary.get("eval_set") or {}
    what = "Classification probes" if "kNN top-1" in columns else "Retrieval on held-out classes"
    lines = [
        f"{what} ({es.get('n', '?')} images, {es.get('classes', '?')} "
        "classes; metrics in %), from `RUN/eval/metrics.json`. It scores the encoder that eval "
        f"read; this folder holds `{exported}` (re-run `megaclass eval` after exporting another "
        "step).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(columns) - 1)) + "|",
    ]
    for row in rows:
        cells = [f"`{row[0]}`", str(row[1])] + ["—" if v is None else f"{v:.1f}" for v in row[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_headline(summary: dict[str, Any]) -> dict[str, float]:
    """``<encoder>/<metric>`` → value at full size (fractions, as in metrics.json)."""
    out: dict[str, float] = {}
    for name in _encoder_order(summary):
        for k, v in (summary["encoders"][name].get("full") or {}).items():
            if isinstance(v, (int, float)):
                out[f"{name}/{k}"] = float(v)
        for probe, res in (summary["encoders"][name].get("probes") or {}).items():
            if isinstance(res, dict) and isinstance(res.get("top1"), (int, float)):
                out[f"{name}/{probe}_top1"] = float(res["top1"])
    return out


# --------------------------------------------------------------------------------------
# the hub
# --------------------------------------------------------------------------------------


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created if missing); its URL.

    Credentials are huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``).
    """
    try:
        from huggingface_hub import create_repo, upload_folder
    except ImportError as e:  # pragma: no cover - open_clip brings huggingface_hub along
        raise ExportError("--push needs huggingface_hub: pip install huggingface_hub") from e
    create_repo(repo_id, private=private, exist_ok=True)
    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message="megaclass export",
        ignore_patterns=[".tmp-*"],  # a concurrent writer's temporary files
    )
    return str(getattr(info, "commit_url", info))


if __name__ == "__main__":
    sys.exit(main())
