"""The ``megaclass`` command line.

Each sub-command imports its stage lazily, so ``megaclass --help`` is instant and a stage's
heavy dependencies (Ray, DeepSpeed) load only when that stage runs.

Every command that writes a run directory holds its lock (core/lock.py) while it runs. A user
error (core/errors.py: a bad config value, a missing input, a busy run directory) is printed as
one line ``megaclass: <message>`` with exit status 2; ``--debug`` (or MEGACLASS_DEBUG=1) adds
its traceback. Any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import megaclass
from megaclass.core.atomic import write_text_atomic
from megaclass.core.config import ConfigError
from megaclass.core.errors import InputError, debug_from_env, user_error_of
from megaclass.core.lock import launcher_rank
from megaclass.core.rundir import RunDir
from megaclass.core.stages import PIPELINE, STAGES, load_entry

# sub-command -> "module:function"; each function takes (cfg: RunConfig, force: bool) -> dict.
STAGE_ENTRYPOINTS = {n: s.entry for n, s in STAGES.items() if s.help} | {
    "run": "megaclass.pipelines.run:run_pipeline"
}


def user_error_message(exc: BaseException) -> str | None:
    """The one line printed for a user error (None: not a user error, keep the traceback)."""
    err = user_error_of(exc)
    if err is None:
        return None
    return f"config error: {err}" if isinstance(err, ConfigError) else str(err)


def run_guarded(fn: Callable[[], int], prog: str = "megaclass", debug: bool = False) -> int:
    """Run ``fn``; a user error (core/errors.py) becomes ``prog: message`` on stderr and exit
    status 2, with its traceback only when ``debug`` (``--debug`` or MEGACLASS_DEBUG=1).

    Why: the message of a user error names the file or key to change; a traceback would only
    bury it. Every other exception propagates with its traceback (a bug or a broken
    environment, where the traceback is what helps)."""
    try:
        return int(fn() or 0)
    except Exception as e:
        msg = user_error_message(e)
        if msg is None:
            raise
        if debug or debug_from_env():
            traceback.print_exc()
        print(f"{prog}: {msg}", file=sys.stderr)
        return 2


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
    ap.add_argument("--version", action="version", version=f"megaclass {megaclass.__version__}")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="print the Python traceback of user errors too (also MEGACLASS_DEBUG=1)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on built-in demo data")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides of configs/demo.yaml")

    _stage_parser(sub, "run", "all stages in order, resumable")
    sub.choices["run"].add_argument(
        "--stages", default=None, help=f"comma-separated subset, run in order: {','.join(PIPELINE)}"
    )
    for name, st in STAGES.items():
        if st.help:
            _stage_parser(sub, name, st.help)

    r = sub.add_parser("report", help="rebuild report.json/md/html from a run directory")
    r.add_argument("run_dir")

    dd = sub.add_parser(
        "data",
        help="build demo shards, or convert a benchmark archive (sop, cub, cars, inshop, "
        "imagefolder) into shards",
    )
    # names only (a test keeps them equal to BUILDERS and CONVERTERS): --help imports no data code
    dd.add_argument(
        "dataset",
        choices=[
            "demo",
            "openclipart",
            "fashion-mnist",
            "sop",
            "cub",
            "cars",
            "inshop",
            "imagefolder",
        ],
    )
    dd.add_argument("--out", required=True, help="output folder for the shards")
    dd.add_argument("--seed", type=int, default=0, help="demo/openclipart/fashion-mnist only")
    dd.add_argument(
        "--src",
        help="the unpacked official archive (sop, cub, cars, inshop) or a class-per-folder "
        "tree (imagefolder); required by those, refused by the others",
    )
    dd.add_argument(
        "--shard-size", type=int, default=None, help="images per shard (converters; default 1000)"
    )

    s = sub.add_parser("slurm", help="render an sbatch script from the config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    slurm_stages = [n for n, st in STAGES.items() if st.slurm] + ["run"]
    s.add_argument("--stage", required=True, choices=slurm_stages)
    s.add_argument("--out", default=None, help="write the script here instead of printing it")

    sub.add_parser("config-help", help="every config key with its type, default and meaning")

    i = sub.add_parser("init", help="write a commented config to edit, from a shipped one")
    i.add_argument("name", nargs="?", default="my-run", help="run name: run_dir becomes runs/NAME")
    i.add_argument("--from", dest="source", default="demo", choices=sorted(SHIPPED_CONFIGS))
    i.add_argument("--out", default=None, help="config file to write (default NAME.yaml)")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")

    x = sub.add_parser(
        "export", add_help=False, help="export a checkpoint for open_clip / the HF hub"
    )
    x.add_argument("args", nargs=argparse.REMAINDER, help="RUN [--step N] [--out DIR] [--push ID]")

    ix = sub.add_parser("index", help="embed a shard set with an eval encoder into a faiss index")
    ix.add_argument("config", help="YAML run config (its encoders, data.class_field, …)")
    ix.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ix.add_argument(
        "--encoder",
        default="student",
        help="an eval.encoders entry: teacher, student, open_clip:<model>[@weights], a path "
        "(default student)",
    )
    ix.add_argument("--shards", required=True, help="shard spec to index (brace ranges, lists)")
    ix.add_argument("--out", required=True, help="index folder to write")
    ix.add_argument(
        "--flat-max", type=int, default=None, help="exact flat index up to this many images, "
        "IVF above (default 500000)",
    )  # fmt: skip
    ix.add_argument("--nlist", type=int, default=None, help="IVF lists (default ≈ 4·sqrt(n))")
    ix.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (stored)")
    ix.add_argument("--seed", type=int, default=None, help="IVF training sample (default: seed)")
    ix.add_argument("--batch-size", type=int, default=None, help="default eval.batch_size")
    ix.add_argument("--device", default=None, help="default eval.device")
    ix.add_argument("--force", action="store_true", help="rebuild an existing index folder")

    q = sub.add_parser(
        "search", add_help=False, help="nearest neighbours of images/texts in an index"
    )
    q.add_argument("args", nargs=argparse.REMAINDER, help="DIR QUERY... [-k 10] [--html FILE]")
    return ap


SHIPPED_CONFIGS = ("demo", "laion400m-vitb32", "laion400m-vitl14-mlcd")
"""Configs `megaclass init --from` copies (configs/<name>.yaml, shipped in the package)."""


def init_config(name: str, source: str, out: str | None, force: bool = False) -> Path:
    """Write configs/<source>.yaml, comments kept, with ``run_dir: runs/<name>`` and a header
    saying what to edit; refuses to overwrite a file unless ``force``."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise InputError(f"megaclass init: run name {name!r}: use letters, digits, '.', '_', '-'")
    path = Path(out or f"{name}.yaml")
    if path.exists() and not force:
        raise InputError(f"megaclass init: {path} exists; pass --force to overwrite it")
    text = (Path(megaclass.__file__).parent / "configs" / f"{source}.yaml").read_text()
    text, n = re.subn(r"(?m)^run_dir:.*$", f"run_dir: runs/{name}", text, count=1)
    if n == 0:
        text = f"run_dir: runs/{name}\n" + text
    header = (
        f"# Written by `megaclass init {name} --from {source}`: edit data.shards (and\n"
        "# data.eval_shards) first; `megaclass config-help` lists every key with its meaning.\n"
        f"# Run it with: megaclass run {path}\n#\n"
    )
    write_text_atomic(path, header + text)
    return path


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw  # accepted anywhere: no config file or override is spelled so
    raw = [a for a in raw if a != "--debug"]
    try:
        return run_guarded(lambda: _dispatch(raw), debug=debug)
    except BrokenPipeError:  # `megaclass config-help | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(raw: list[str]) -> int:
    if raw[:2] == ["train", "reshard"]:  # `megaclass train reshard RUN --world-size N`
        return int(load_entry("megaclass.pipelines.train:reshard_main")(raw[2:]))
    if raw[:1] == ["export"]:  # `megaclass export RUN [--step N] [--out DIR] [--push REPO_ID]`
        return int(load_entry("megaclass.pipelines.export:main")(raw[1:]))
    if raw[:1] == ["search"]:  # `megaclass search DIR QUERY... [-k 10] [--html FILE]`
        return int(load_entry("megaclass.pipelines.search:main")(raw[1:]))
    args = build_parser().parse_args(raw)
    command = shlex.join(["megaclass", *raw])
    # the run config imports every stage package's config (torch among them): loaded here,
    # not at module import, so that `megaclass --help` stays instant
    from megaclass.pipelines.config import config_help, load_config

    if args.cmd == "config-help":
        sys.stdout.write(config_help() + "\n")
        sys.stdout.flush()
        return 0
    if args.cmd == "init":
        path = init_config(args.name, args.source, args.out, args.force)
        print(f"megaclass: wrote {path}; edit data.shards, then `megaclass run {path}`")
        return 0
    if args.cmd in STAGE_ENTRYPOINTS:
        if args.cmd == "train" and launcher_rank() is not None:  # a rank under torchrun/srun
            load_entry("megaclass.pipelines.train:die_with_launcher")()
        cfg = load_config(args.config, args.overrides)
        kw = {}
        if args.cmd == "run" and args.stages:
            kw["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
        with RunDir(cfg.run_dir).lock(command):  # one writer per run directory
            result = load_entry(STAGE_ENTRYPOINTS[args.cmd])(cfg, force=args.force, **kw)
        if isinstance(result, dict) and result.get("print_json", False):
            print(json.dumps(result, indent=2, default=str))
        return 0
    if args.cmd == "index":  # writes its own folder (locked), reads the run directory
        from megaclass.core.lock import exclusive
        from megaclass.pipelines.index import DEFAULT_FLAT_MAX, build_index

        cfg = load_config(args.config, args.overrides)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise InputError(f"megaclass index: --out {args.out} exists and is not a folder")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with exclusive(args.out, command):
            build_index(
                cfg,
                args.encoder,
                args.shards,
                args.out,
                flat_max=DEFAULT_FLAT_MAX if args.flat_max is None else args.flat_max,
                nlist=args.nlist,
                nprobe=args.nprobe,
                seed=args.seed,
                batch_size=args.batch_size,
                device=args.device,
                force=args.force,
            )
        return 0
    if args.cmd == "demo":
        return int(load_entry("megaclass.pipelines.demo:run_demo")(args.out, args.overrides) or 0)
    if args.cmd == "report":  # no lock: rebuilding the report of a running run is fine
        load_entry("megaclass.pipelines.report:build_report")(args.run_dir)
        return 0
    if args.cmd == "data":
        from megaclass.data.converters import CONVERTERS, ConvertError

        if args.dataset in CONVERTERS:
            if not args.src:
                raise ConvertError(f"megaclass data {args.dataset} needs --src DIR (the archive)")
            size = 1000 if args.shard_size is None else args.shard_size
            load_entry("megaclass.data.converters:convert")(
                args.dataset, args.src, args.out, shard_size=size
            )
            return 0
        if args.src or args.shard_size is not None:
            raise ConvertError(
                f"--src/--shard-size are for {', '.join(CONVERTERS)}; "
                f"megaclass data {args.dataset} builds its own images"
            )
        load_entry("megaclass.data.builders:build_dataset")(args.dataset, args.out, seed=args.seed)
        return 0
    if args.cmd == "slurm":
        cfg = load_config(args.config, args.overrides)
        script = load_entry("megaclass.pipelines.slurm:render")(cfg, args.stage, args.config)
        if args.out:
            write_text_atomic(args.out, script)
        else:
            sys.stdout.write(script)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
