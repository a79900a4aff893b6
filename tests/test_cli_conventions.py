"""CLI conventions: --version, init, a pipe that closes early, run --stages, export registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import megaclass
import pytest
from megaclass.pipelines.cli import SHIPPED_CONFIGS, main
from megaclass.pipelines.config import load_config

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "megaclass.pipelines.cli", *args], capture_output=True,
                          text=True, cwd=kw.get("cwd", REPO), timeout=120)  # fmt: skip


def test_version() -> None:
    res = _cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"megaclass {megaclass.__version__}"


def test_config_help_into_a_closed_pipe_ends_quietly() -> None:
    res = subprocess.run(
        f"set -o pipefail; {PY} -m megaclass.pipelines.cli config-help | head -1",
        shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("run_dir") and "Traceback" not in res.stderr
    assert "BrokenPipe" not in res.stderr


@pytest.mark.parametrize("source", SHIPPED_CONFIGS)
def test_init_writes_a_config_that_loads_as_written(tmp_path: Path, source: str) -> None:
    out = tmp_path / "mine.yaml"
    assert main(["init", "exp1", "--from", source, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Written by `megaclass init exp1") and "config-help" in text
    cfg = load_config(out)
    assert cfg.run_dir == "runs/exp1"
    shipped = load_config(REPO / "configs" / f"{source}.yaml")
    shipped.run_dir = cfg.run_dir
    assert cfg == shipped  # every other setting as shipped
    assert main(["init", "exp1", "--from", source, "--out", str(out)]) == 2  # no overwrite
    assert main(["init", "bad name", "--out", str(tmp_path / "x.yaml")]) == 2


def test_run_takes_stages(tmp_path: Path) -> None:
    """`megaclass run CONFIG --stages …` runs just those (here the report of an empty run), and
    an unknown stage is one line, exit 2. The config from `megaclass init` equals the shipped
    one but for run_dir (above), and the shipped demo config runs in tests/test_run.py."""
    out = tmp_path / "d.yaml"
    assert main(["init", "d", "--out", str(out)]) == 0
    run = tmp_path / "run"
    res = _cli("run", str(out), f"run_dir={run}", "--stages", "report")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "report.json").is_file() and not (run / "embed").exists()
    res = _cli("run", str(out), f"run_dir={run}", "--stages", "bogus")
    assert res.returncode == 2 and "bogus" in res.stderr and "Traceback" not in res.stderr


def test_export_is_a_subcommand() -> None:
    res = _cli("export", "--help")
    assert res.returncode == 0 and "--step" in res.stdout
