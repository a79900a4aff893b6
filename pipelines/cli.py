"""The ``megaclass`` command line.

Each sub-command imports its stage lazily, so ``megaclass --help`` is instant and a stage's
heavy dependencies (Ray, DeepSpeed) load only when that stage runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from megaclass.core.config import ConfigError
from megaclass.core.rundir import ConfigChangedError
from megaclass.core.stages import STAGES, load_entry

# sub-command -> "module:function"; each function takes (cfg: RunConfig, force: bool) -> dict.
STAGE_ENTRYPOINTS = {n: s.entry for n, s in STAGES.items() if s.help} | {
    "run": "megaclass.pipelines.run:run_pipeline"
}




def _stage_parser(sub: argparse._SubParsersAction, name: str, help_: str) -> None:
    p = sub.add_parser(name, help=help_)
    p.add_argument("config", help="YAML run config (configs/demo.yaml, …)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cluster.k=256")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megaclass",
        description="Pretrain retrieval encoders on clustered pseudo-classes (Unicom / MLCD).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on built-in demo data")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides of configs/demo.yaml")

    _stage_parser(sub, "run", "all stages in order, resumable")
    for name, st in STAGES.items():
        if st.help:
            _stage_parser(sub, name, st.help)

    r = sub.add_parser("report", help="rebuild report.json/md/html from a run directory")
    r.add_argument("run_dir")

    dd = sub.add_parser("data", help="build demo/evaluation shards")
    dd.add_argument("dataset", choices=["demo", "openclipart", "fashion-mnist"])
    dd.add_argument("--out", required=True, help="output folder for the shards")
    dd.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("slurm", help="render an sbatch script from the config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    slurm_stages = [n for n, st in STAGES.items() if st.slurm] + ["run"]
    s.add_argument("--stage", required=True, choices=slurm_stages)
    s.add_argument("--out", default=None, help="write the script here instead of printing it")

    sub.add_parser("config-help", help="every config key with its type, default and meaning")
    return ap


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:2] == ["train", "reshard"]:  # `megaclass train reshard RUN --world-size N`
        return int(load_entry("megaclass.pipelines.train:reshard_main")(raw[2:]))
    args = build_parser().parse_args(raw)
    try:
        # the run config imports every stage package's config (torch among them): loaded here,
        # not at module import, so that `megaclass --help` stays instant
        from megaclass.pipelines.config import config_help, load_config

        if args.cmd == "config-help":
            print(config_help())
            return 0
        if args.cmd in STAGE_ENTRYPOINTS:
            cfg = load_config(args.config, args.overrides)
            result = load_entry(STAGE_ENTRYPOINTS[args.cmd])(cfg, force=args.force)
            if isinstance(result, dict) and result.get("print_json", False):
                print(json.dumps(result, indent=2, default=str))
            return 0
        if args.cmd == "demo":
            return int(
                load_entry("megaclass.pipelines.demo:run_demo")(args.out, args.overrides) or 0
            )
        if args.cmd == "report":
            load_entry("megaclass.pipelines.report:build_report")(args.run_dir)
            return 0
        if args.cmd == "data":
            load_entry("megaclass.data.builders:build_dataset")(
                args.dataset, args.out, seed=args.seed
            )
            return 0
        if args.cmd == "slurm":
            cfg = load_config(args.config, args.overrides)
            script = load_entry("megaclass.pipelines.slurm:render")(cfg, args.stage, args.config)
            if args.out:
                from megaclass.core.atomic import write_text_atomic

                write_text_atomic(args.out, script)
            else:
                sys.stdout.write(script)
            return 0
    except ConfigError as e:
        print(f"megaclass: config error: {e}", file=sys.stderr)
        return 2
    except ConfigChangedError as e:
        print(f"megaclass: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
