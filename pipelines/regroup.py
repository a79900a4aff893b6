"""The regroup stage: label sidecars per training shard, when labels were assigned elsewhere.

Labels are assigned where the embeddings are. With the embed stage run on ``data.shards`` the
sidecars already are per training shard and this stage only records that. With bring-your-own
embeddings (LAION's published ``img_emb/metadata`` parts) or bring-your-own labels named after
anything else, it rebuilds one sidecar per training shard by key into ``RUN/shard_labels/``
(``data/regroup.py``), and the trainer reads them from there (``labels_dir_of``). Resumable:
parts and shards already done are kept (docs/architecture.md, "regroup").
"""

from __future__ import annotations

import logging
from typing import Any

from megaclass.core.rundir import RunDir
from megaclass.data.labels import label_path
from megaclass.data.regroup import regroup_labels
from megaclass.data.shards import expand_shards, shard_stem
from megaclass.pipelines.config import RunConfig, labels_dir_of

log = logging.getLogger(__name__)


def run_regroup(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Make sure every training shard has a sidecar; regroup by key when they do not."""
    rd = RunDir(cfg.run_dir)
    done = rd.begin_stage(cfg, "regroup", force)
    if done is not None:
        return done
    if cfg.train.objective == "siglip":
        summary: dict[str, Any] = {"regrouped": False, "reason": "siglip trains without labels"}
        rd.finish_stage("regroup", summary)
        return summary
    source = labels_dir_of(cfg, as_assigned=True)
    urls = expand_shards(cfg.data.shards, cfg.data.allow_pipe_in_lists)
    stems = [shard_stem(u) for u in urls]
    missing = [s for s in stems if not label_path(source, s).is_file()]
    if not missing:
        summary = {
            "regrouped": False,
            "reason": "every training shard has a label sidecar where the labels were assigned",
            "labels_dir": str(source),
            "training_shards": len(stems),
        }
    else:
        log.info(
            "regroup: %d of %d training shards have no sidecar in %s: regrouping by key",
            len(missing),
            len(stems),
            source,
        )
        summary = regroup_labels(
            source, stems, rd.folder("regroup"), shard_digits=cfg.assign.key_shard_digits
        )
    rd.finish_stage("regroup", summary)
    return summary
