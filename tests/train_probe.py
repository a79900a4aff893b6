"""Test helper (not collected): restore the newest checkpoint of a run and print the loss on a
fixed global batch. Run under any launcher; rank r takes its contiguous slice of the batch.

    python tests/train_probe.py CONFIG OUT.json [overrides…]
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg_path, out = args[0], args[1]
    torch.set_num_threads(1)
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.train import make_job
    from megaclass.training import trainer

    cfg = load_config(cfg_path, args[2:])
    st = trainer.setup(make_job(cfg), make_loader=lambda *a, **k: None)
    assert st.resumed_from is not None, "the probe needs a checkpoint to restore"
    g = torch.Generator().manual_seed(1234)
    n = 8
    images = torch.randn(n, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    labels = torch.randint(0, st.num_classes, (n, 4), generator=g)
    r, w = st.env.rank, st.env.world_size
    sl = slice(r * n // w, (r + 1) * n // w)
    st.engine.module.eval()
    st.head.eval()
    with torch.no_grad():
        emb = st.engine(images[sl]).float()
        lab = labels[sl] if cfg.train.objective == "mlcd" else labels[sl, 0]
        loss = float(st.head(emb, lab, step=0))
    if r == 0:
        with open(out, "w") as f:
            json.dump({"loss": loss, "world_size": w, "step": st.step}, f)
    from megaclass.training.engine import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    main()
