from pathlib import Path

import pytest
import yaml
from megaclass.core.rundir import ConfigChangedError, RunDir
from megaclass.pipelines.config import ConfigError, RunConfig, config_help, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = _write(tmp_path, "cluster:\n  k: 16\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(p, ["cluster.k=32", "train.sample_rate=0.5", "eval.compact_dims=[8, 16]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.cluster.k == 32
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.sample_rate == 0.5
    assert cfg.eval.compact_dims == [8, 16]
    assert cfg.embed.batch_size == 64  # untouched default


@pytest.mark.parametrize(
    "text,overrides,needle",
    [
        ("cluster:\n  kk: 3\n", [], "cluster.kk: unknown key"),
        ("cluster:\n  k: many\n", [], "cluster.k: expected int"),
        ("", ["train.steps=1.5"], "train.steps: expected int"),
        ("", ["cluster.backend=gpu-magic"], "cluster.backend"),
        ("", ["nosuch.k=1"], "nosuch: unknown key"),
        ("", ["train.freeze_backbone=maybe"], "train.freeze_backbone: expected true/false"),
        ("", ["eval.recall_ks=[1, x]"], "eval.recall_ks[1]: expected int"),
        ("- a list\n", [], "top level must be a mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert needle in str(e.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_documented():
    text = config_help()
    for line in text.splitlines():
        if line.startswith("  "):
            assert not line.rstrip().endswith(":"), f"undocumented field: {line}"


def test_run_dir_refuses_changed_config(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.k=8"])
    rd.write_config(cfg)
    rd.write_config(cfg)  # same config: fine
    stored = yaml.safe_load(rd.config_path.read_text())
    assert stored["cluster"]["k"] == 8
    RunDir.write_done(rd.embed, "shard-0", {})  # stage output: the config is no longer provisional
    changed = load_config(None, [f"run_dir={tmp_path / 'run'}", "cluster.k=9"])
    with pytest.raises(ConfigChangedError, match=r"cluster\.k: 8 -> 9"):
        rd.write_config(changed)
    rd.write_config(changed, force=True)
    assert yaml.safe_load(rd.config_path.read_text())["cluster"]["k"] == 9


def test_run_dir_ignores_where_it_runs(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_config(load_config(None, ["slurm.time=01:00:00"]))
    RunDir.write_done(rd.embed, "shard-0", {})  # stage output: the config is no longer provisional
    rd.write_config(load_config(None, ["slurm.time=02:00:00", "ray.address=auto"]))  # no error
    with pytest.raises(ConfigChangedError):
        rd.write_config(load_config(None, ["train.steps=7"]))


def test_every_stage_accepts_another_split_of_the_global_batch(tmp_path):
    """A requeued job on another node count (train.nproc / micro_batch_size / grad_accum /
    launcher) resumes through `megaclass run` and every stage; anything else is still refused."""
    from megaclass.pipelines.config import write_run_config

    run = f"run_dir={tmp_path / 'run'}"
    rd = RunDir(tmp_path / "run")
    write_run_config(rd, load_config(None, [run, "train.nproc=2", "train.micro_batch_size=8"]))
    RunDir.write_done(rd.embed, "shard-0", {})  # stage output: the config is no longer provisional
    write_run_config(
        rd,
        load_config(None, [run, "train.nproc=1", "train.grad_accum=2", "train.micro_batch_size=8"]),
    )
    stored = yaml.safe_load(rd.config_path.read_text())["train"]
    assert (stored["nproc"], stored["grad_accum"]) == (1, 2)  # the file follows the new split
    with pytest.raises(ConfigChangedError, match=r"train\.lr"):
        write_run_config(rd, load_config(None, [run, "train.nproc=2", "train.lr=0.5"]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["cluster.bf16=true"], "cluster.bf16"),
        (["cluster.backend=hierarchical", "cluster.bf16=true"], "cluster.bf16"),
        (["cluster.coarse_k=10"], "cluster.coarse_k"),
        (["cluster.refine_niter=2"], "cluster.refine_niter"),
        (["cluster.hier_parallel=ray"], "cluster.hier_parallel"),
        (["assign.nprobe=16"], "assign.nprobe"),
        (["assign.ef_search=64"], "assign.ef_search"),
        (["assign.method=tree", "assign.num_gpus_per_actor=1"], "assign.num_gpus_per_actor"),
        (["assign.bf16=true"], "assign.bf16"),
    ],
)
def test_an_option_the_chosen_backend_ignores_is_an_error(overrides, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_options_used_by_the_chosen_backend_are_accepted() -> None:
    load_config(None, ["cluster.backend=distributed", "cluster.bf16=true"])
    load_config(
        None, ["cluster.backend=hierarchical", "cluster.coarse_k=10", "cluster.hier_parallel=ray"]
    )
    load_config(None, ["assign.method=tree", "assign.nprobe=16"])
    load_config(None, ["assign.num_gpus_per_actor=1", "assign.bf16=true"])
    for name in ("demo", "laion400m-vitb32", "laion400m-vitl14-mlcd"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")


def test_a_run_from_before_new_config_keys_resumes(tmp_path) -> None:
    """config.yaml written before a key existed: the key takes its default, no 'changed'."""
    run = tmp_path / "run"
    rd = RunDir(run)
    cfg = load_config(None, [f"run_dir={run}"])
    rd.write_config(cfg)
    old = yaml.safe_load(rd.config_path.read_text())
    del old["memory_check"], old["train"]["margin_m1"], old["data"]["allow_pipe_in_lists"]
    rd.config_path.write_text(yaml.safe_dump(old))
    (run / "cluster").mkdir()
    (run / "cluster" / "centroids.npy").write_bytes(b"x")  # the run has output
    rd.write_config(cfg)  # no ConfigChangedError: the missing keys are defaults
    with pytest.raises(ConfigChangedError, match="train.margin_m1"):
        rd.write_config(
            load_config(None, [f"run_dir={run}", "train.margin=combined", "train.margin_m1=0.9"])
        )
