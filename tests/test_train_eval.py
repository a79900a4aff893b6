"""Eval during training (train.eval_every): a real DeepSpeed training with the hook against one
without — same checkpoints tensor for tensor, same losses — and the eval lines in
metrics.jsonl; then the eval stage on a checkpoint step (`RUN@step=N`) reproduces the logged
Recall@1 and mAP@R."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval import _eval_shards  # noqa: E402
from test_train import PY, REPO, _check, _env, _make_run, assert_trees, write_shards  # noqa: E402

pytestmark = pytest.mark.slow


# Both runs in one fresh process (one rank, gloo): the DeepSpeed start-up is paid once and the
# two trainings see the same library state, so any difference is the hook's.
TWO_RUNS = """
import sys
from megaclass.pipelines.config import load_config
from megaclass.pipelines.train import make_job
from megaclass.training import trainer
from megaclass.training.engine import shutdown_distributed
for cfg in sys.argv[1:]:
    trainer.train(make_job(load_config(cfg)))
shutdown_distributed()
"""


def _run(root: Path, shards, name: str, eval_spec: str, **train) -> Path:
    run = _make_run(root, shards, name, steps=4, ckpt_every=2, log_every=1, **train)
    cfg = yaml.safe_load((run / "cfg.yaml").read_text())
    cfg["data"]["eval_shards"] = eval_spec
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return run


def _identical(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_eval_every_leaves_checkpoints_identical(tmp_path):
    shards = write_shards(tmp_path / "shards")
    ev = _eval_shards(tmp_path / "eval")
    plain = _run(tmp_path, shards, "plain", ev["spec"])
    hooked = _run(tmp_path, shards, "hooked", ev["spec"], eval_every=2, eval_max_images=64)
    cmd = [PY, "-c", TWO_RUNS, str(plain / "cfg.yaml"), str(hooked / "cfg.yaml")]
    _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=REPO))

    lines = [json.loads(x) for x in (hooked / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x.get("kind") == "eval"]
    assert [x["step"] for x in evals] == [2, 4]
    for x in evals:
        assert set(x) == {"step", "kind", "encoder", "recall@1", "map@r", "seconds"}
        assert x["encoder"] == "student" and 0 <= x["map@r"] <= x["recall@1"] <= 1
    plain_lines = (plain / "train" / "metrics.jsonl").read_text().splitlines()
    assert not any('"kind"' in x for x in plain_lines)
    assert [x["step"] for x in lines if "kind" not in x] == [1, 2, 3, 4]

    # every checkpoint: the same files, the same tensors, loss for loss the same metrics
    for step in ("step-0000002", "step-0000004"):
        a, b = plain / "train" / "ckpt" / step, hooked / "train" / "ckpt" / step
        names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
        for rel in names:
            if rel.endswith(".pt"):
                assert_trees(
                    torch.load(a / rel, weights_only=False),
                    torch.load(b / rel, weights_only=False),
                    _identical,
                    f"{step}/{rel}",
                )
    losses = [json.loads(x)["loss"] for x in plain_lines]
    assert losses == [x["loss"] for x in lines if "kind" not in x]

    # the eval stage on the step-4 checkpoint (RUN@step=4) gives the Recall@1 logged at step 4:
    # same weights, same eval transform, same images (all 32 fit in eval_max_images)
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.eval import run_eval

    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'evalrun'}",
            f"data.eval_shards={ev['spec']}",
            f"eval.encoders={json.dumps([f'{hooked}@step=4', f'{hooked}/train/ckpt/step-0000004'])}",
            "eval.compact_dims=[]",
        ],
    )
    res = run_eval(cfg)
    assert res["encoder_order"] == ["hooked@4", "step-0000004"]
    for name in res["encoder_order"]:
        assert res["encoders"][name]["full"]["recall@1"] == pytest.approx(evals[1]["recall@1"])
        assert res["encoders"][name]["full"]["map@r"] == pytest.approx(evals[1]["map@r"])


def test_hook_restores_train_mode_and_rng(tmp_path):
    """In-process (no process group: rank 0): a model with dropout stays in train mode and
    the RNG streams continue as if the hook had not run."""
    import random

    import numpy as np
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.train_eval import make_eval_hook

    ev = _eval_shards(tmp_path / "eval")
    assert make_eval_hook(load_config(None, [])) is None  # eval_every=0: no hook at all
    cfg = load_config(None, [f"data.eval_shards={ev['spec']}", "train.eval_every=5"])
    hook = make_eval_hook(cfg)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 16)
    ).train()

    def transform(img):
        return torch.from_numpy(np.asarray(img.resize((8, 8)), np.float32) / 255).permute(2, 0, 1)

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    out = hook(5, model, transform)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and (want[1] == got[1]).all() and want[2] == got[2]
    assert model.training and set(out) == {"recall@1", "map@r", "seconds"}
    # eval mode inside: dropout off, so a second call gives the same numbers
    again = hook(10, model, transform)
    assert (again["recall@1"], again["map@r"]) == (out["recall@1"], out["map@r"])
