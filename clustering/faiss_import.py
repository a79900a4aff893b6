"""The one place megaclass imports faiss, so that a missing faiss is one clear message.

Why a helper: faiss is no longer a base dependency. ``faiss-cpu`` and ``faiss-gpu-cu12`` both
install the module ``faiss`` into the same folder, and pip cannot express "one of these two",
so each lives in its own extra (``megaclass[cpu]`` / ``megaclass[gpu]``; ``demo`` and ``dev``
include ``cpu``). An install without either extra gets a bare ``No module named 'faiss'`` deep
inside a clustering stage; this says which two commands fix it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = (
    'install one faiss build: pip install "megaclass[cpu]" (faiss-cpu) or '
    'pip install "megaclass[gpu]" (faiss-gpu-cu12, CUDA 12); from a checkout: '
    'pip install -e ".[cpu]" or pip install -e ".[gpu]". Never both: they overwrite each '
    "other's files (pip uninstall faiss-cpu faiss-gpu-cu12, then install one)"
)


def import_faiss() -> ModuleType:
    """``import faiss``, or an ImportError naming the two install commands.

    An ImportError raised while faiss itself loads (a missing CUDA library of faiss-gpu, a
    half-overwritten install) keeps its own text in the message and as ``__cause__``.
    """
    try:
        return importlib.import_module("faiss")
    except ImportError as e:
        raise ImportError(f"megaclass needs faiss ({e}); {INSTALL_HINT}") from e
