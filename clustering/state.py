"""Per-iteration k-means checkpoints: ``STATE/iter-NNNN.npz``.

Each file holds the centroids after that iteration, the iteration number, the objective
history, the RNG state (JSON of numpy's bit-generator state) and a fingerprint of the run
(data + parameters). A restart resumes from the newest file with the same fingerprint; since
an iteration is a deterministic function of (centroids, RNG state, data), the resumed run ends
with the same centroids as an uninterrupted one. Files are written atomically and durably
(core/atomic.py fsyncs the data before the rename and the folder after it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megaclass.core.atomic import atomic_path

log = logging.getLogger(__name__)
_NAME = re.compile(r"^iter-(\d{4,})\.npz$")


@dataclass
class KMeansState:
    centroids: np.ndarray
    iteration: int
    objective: list[float]
    rng_state: dict
    n_reseeded: list[int]


def rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def save_state(state_dir: str | Path, st: KMeansState, fingerprint: str) -> Path:
    state_dir = Path(state_dir)
    final = state_dir / f"iter-{st.iteration:04d}.npz"
    with atomic_path(final, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                centroids=st.centroids.astype(np.float32),
                iteration=np.int64(st.iteration),
                objective=np.asarray(st.objective, dtype=np.float64),
                n_reseeded=np.asarray(st.n_reseeded, dtype=np.int64),
                rng_state=np.array(json.dumps(st.rng_state)),
                fingerprint=np.array(fingerprint),
            )
    return final


def load_latest(state_dir: str | Path, fingerprint: str) -> KMeansState | None:
    """Newest readable state with this fingerprint (older or foreign files are ignored)."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in state_dir.iterdir() if (m := _NAME.match(p.name))),
        reverse=True,
    )
    for _it, path in found:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != fingerprint:
                    log.warning("%s: belongs to a different run (fingerprint), ignored", path)
                    continue
                return KMeansState(
                    centroids=z["centroids"].copy(),
                    iteration=int(z["iteration"]),
                    objective=[float(v) for v in z["objective"]],
                    rng_state=json.loads(str(z["rng_state"])),
                    n_reseeded=[int(v) for v in z["n_reseeded"]],
                )
        except Exception as e:  # a torn or foreign file: fall back to the previous one
            log.warning("%s: unreadable checkpoint (%s), ignored", path, e)
    return None
