"""Process-group setup, the DeepSpeed config built from ours, optimizers and the LR schedule.

One code path for every launcher: ``deepspeed --num_gpus N``, ``torchrun``, ``srun`` (Slurm
variables mapped onto torch's), and a bare ``python``/``megaclass train`` (a world of one on a
free local port). On CPU the backend is gloo; on GPUs NCCL.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megaclass.core.config import ConfigError
from megaclass.core.net import free_port
from megaclass.training.config import TrainConfig
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def map_launcher_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables for this process, derived from whatever launched it.

    Precedence: torch's own variables (deepspeed/torchrun set them), then Slurm's
    (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the first host of
    ``SLURM_JOB_NODELIST`` as master unless MASTER_ADDR is set), else a single process.
    Returns the variables to set (does not modify ``environ``).
    """
    env = dict(os.environ if environ is None else environ)
    out: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", env["RANK"])
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out["RANK"] = env["SLURM_PROCID"]
        out["WORLD_SIZE"] = env["SLURM_NTASKS"]
        out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:
            # deterministic per job so every task picks the same port
            out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    else:
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" not in env:
            out["MASTER_PORT"] = str(free_port())
    return out


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,010],cpu1' -> 'gpu003' (what `scontrol show hostnames | head -1` gives)."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    item = rest.split("]")[0].split(",")[0].split("-")[0]
    return prefix + item


def init_distributed() -> DistEnv:
    """Initialise torch.distributed (through DeepSpeed) from the launcher's environment."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(map_launcher_env())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(rank, local_rank, world, device, backend)


def shutdown_distributed(barrier: bool = True) -> None:
    """Leave the process group cleanly: wait for every rank (``barrier``), then destroy it.

    Exiting with a live gloo group lets the interpreter tear down its worker threads in any
    order; a rank then aborts with "terminate called without an active exception" (status
    -6) *after* the work finished, which the launcher reports as a failed run. Pass
    ``barrier=False`` on error paths, where another rank may already be gone.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    env = os.environ
    if "MASTER_PORT" in env and "RANK" in env:
        remove_deepspeed_shm(env["MASTER_PORT"], env.get("MASTER_ADDR", ""), env["RANK"])


SHM_DIR = Path("/dev/shm")


def remove_deepspeed_shm(
    port: str | int, addr: str = "*", rank: str | int = "*", shm_dir: Path = SHM_DIR
) -> list[Path]:
    """Delete the shared-memory files DeepSpeed's CPU all-reduce made for the job whose
    MASTER_PORT is ``port`` (``addr``/``rank``: that master address / global rank only; "*" =
    any). Returns the files removed.

    Why: on CPU with every rank on one machine, DeepSpeed's communication backend maps a
    64 MiB workspace per rank under /dev/shm (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>``) and never unlinks it, so each training run left 64 MiB per rank of RAM-backed
    files behind (118 of them, 7.7 GB, after one day of this project's tests). Each rank removes
    its own at a clean shutdown (the peers have it mapped already; the mapping outlives the
    name), and the local launcher removes whatever its ranks left when they were killed."""
    parts = [str(os.getuid()), str(addr), str(port), str(rank)]
    pattern = "_".join(
        ["deepspeed_allreduce_buffer"] + [v if v == "*" else glob.escape(v) for v in parts]
    )
    removed = []
    for path in shm_dir.glob(pattern):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # a peer removed it first
            pass
    return removed


# --------------------------------------------------------------------------------------
# DeepSpeed config
# --------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def build_ds_config(tc: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """DeepSpeed JSON config from our TrainConfig; ``tc.ds_config`` (a JSON file) merged on top.

    The optimizer and scheduler are ours (passed to ``deepspeed.initialize``), so the config
    has no ``optimizer``/``scheduler`` sections unless the user's file adds them.
    """
    if tc.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.zero_stage: must be 0, 1 or 2, got {tc.zero_stage}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch_size * tc.grad_accum * world_size,
        "gradient_clipping": float(tc.grad_clip),
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
    if tc.ds_config:
        path = Path(tc.ds_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"train.ds_config: file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"train.ds_config: {path} must hold a JSON object")
        cfg = deep_merge(cfg, user)
        mb = cfg["train_micro_batch_size_per_gpu"]
        ga = cfg["gradient_accumulation_steps"]
        if "train_batch_size" not in user:
            cfg["train_batch_size"] = mb * ga * world_size
    return cfg


def check_precision(ds_config: dict[str, Any], accelerator: Any = None) -> None:
    """Refuse a half precision that DeepSpeed's accelerator cannot run, naming our key.

    DeepSpeed's CPU accelerator runs bf16, but fp16 only where oneDNN has fp16 kernels (most
    CPUs have none); DeepSpeed itself would fail later with "Type fp16 is not supported on
    your device". ``accelerator``: DeepSpeed's ``get_accelerator()`` (default: the current one).
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    name = getattr(accelerator, "device_name", lambda: "?")()
    for key, ok in (
        ("fp16", accelerator.is_fp16_supported),
        ("bf16", accelerator.is_bf16_supported),
    ):
        if (ds_config.get(key) or {}).get("enabled") and not ok():
            hint = " (use train.precision=bf16 or fp32 on CPU)" if key == "fp16" else ""
            raise ConfigError(
                f"train.precision: {key} is not supported by DeepSpeed's {name!r} accelerator on "
                f"this machine (set by train.precision={key} or {key}.enabled in "
                f"train.ds_config){hint}"
            )


# --------------------------------------------------------------------------------------
# Optimizers and schedule
# --------------------------------------------------------------------------------------


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices/convolutions; not biases, norms, embeddings' scalars, logit scale/bias."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(
    groups: list[dict[str, Any]], tc: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ConfigError(f"train.optimizer: {tc.optimizer!r} is not one of adamw, sgd")


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` steps.

    A class (not a lambda) so its parameters are visible; LambdaLR state holds only the step.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = max(0, warmup), max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    opt: torch.optim.Optimizer, tc: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(tc.warmup_steps, tc.steps))
