"""RowSparseOptimizer (AdamW) state survives a checkpoint round trip exactly.

torch's Optimizer.load_state_dict casts state tensors to the parameter's dtype; for a bf16 head
the per-row step counts became bf16, where 256 + 1 == 256: after a resume the counts stuck and
every update was scaled by ~0.48. The counts must come back int64 and equal, and the run after
a restore must be bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import io

import pytest
import torch
from megaclass.training.optim import RowSparseOptimizer

ROWS, DIM = 12, 6


def _grad(step: int, dtype: torch.dtype) -> torch.Tensor:
    """A row-sparse gradient: rows 0-3 every step (they pass 256), others now and then."""
    g = torch.Generator().manual_seed(1000 + step)
    extra = torch.randperm(ROWS - 4, generator=g)[:3] + 4
    rows = torch.cat([torch.arange(4), extra]).sort().values
    vals = torch.randn(len(rows), DIM, generator=g).to(dtype)
    return torch.sparse_coo_tensor(rows[None], vals, (ROWS, DIM)).coalesce()


def _make(w0: torch.Tensor) -> tuple[torch.nn.Parameter, RowSparseOptimizer]:
    p = torch.nn.Parameter(w0.clone())
    return p, RowSparseOptimizer([p], algo="adamw", lr=1e-2, weight_decay=0.01)


def _run(p: torch.nn.Parameter, opt: RowSparseOptimizer, steps: range) -> None:
    for s in steps:
        p.grad = _grad(s, p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _round_trip(sd: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_step_counts_stay_int64_and_resume_is_bit_identical(dtype):
    before, after = 300, 40  # rows 0-3 reach 300 (> 256, where bf16 stops counting by one)
    # small weights: bf16 resolves the ~1e-3 updates (near 1.0 it would round most to 0)
    w0 = (0.01 * torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))).to(dtype)

    p_ref, opt_ref = _make(w0)  # uninterrupted
    _run(p_ref, opt_ref, range(before + after))

    p_a, opt_a = _make(w0)  # interrupted after `before` steps ...
    _run(p_a, opt_a, range(before))
    saved = _round_trip(opt_a.state_dict())
    counts = opt_a.state[p_a]["row_step"].clone()
    assert counts[:4].tolist() == [before] * 4
    p_b, opt_b = _make(p_a.detach())  # ... and resumed in a fresh process's objects
    opt_b.load_state_dict(saved)
    st = opt_b.state[p_b]
    assert st["row_step"].dtype == torch.int64
    assert torch.equal(st["row_step"], counts)
    assert st["exp_avg"].dtype == dtype and torch.equal(st["exp_avg"], opt_a.state[p_a]["exp_avg"])
    _run(p_b, opt_b, range(before, before + after))

    ref = opt_ref.state[p_ref]
    assert torch.equal(opt_b.state[p_b]["row_step"], ref["row_step"])
    assert ref["row_step"][:4].tolist() == [before + after] * 4
    assert torch.equal(p_b.detach(), p_ref.detach())  # the same updates, bit for bit
    assert (p_ref.detach() - w0).float().abs().mean() > 0.05  # and they did move the rows


def test_bf16_adamw_moves_like_fp32():
    """The bias corrections are computed in float32: in bf16, 0.999 rounds to 1.0 and
    1 - 0.999**t was 0, so every bf16 update was m/inf = 0 and a bf16 head never moved."""
    w0 = (0.01 * torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))).bfloat16()
    p16, opt16 = _make(w0)
    p32, opt32 = _make(w0.float())
    _run(p16, opt16, range(30))
    _run(p32, opt32, range(30))  # the same (bf16-representable) gradients, in fp32
    d16 = (p16.detach().float() - w0.float()).flatten()
    d32 = (p32.detach() - w0.float()).flatten()
    assert d32.norm() > 0.05
    assert (d16 - d32).norm() < 0.05 * d32.norm()  # bf16 rounding, not a different update


def test_float_counts_from_a_checkpoint_of_an_unfixed_resume_are_read_back_as_int64():
    """A checkpoint written after a resume with the old code holds float counts: they are
    rounded back to int64 (their value is whatever the old run had reached)."""
    w0 = torch.zeros(ROWS, DIM, dtype=torch.bfloat16)
    p, opt = _make(w0)
    _run(p, opt, range(3))
    sd = opt.state_dict()
    sd["state"][0]["row_step"] = sd["state"][0]["row_step"].to(torch.bfloat16)
    p2, opt2 = _make(w0)
    opt2.load_state_dict(_round_trip(sd))
    t = opt2.state[p2]["row_step"]
    assert t.dtype == torch.int64 and torch.equal(t, opt.state[p]["row_step"])


def test_sgd_state_loads_unchanged():
    """No counts to protect: the override leaves torch's loading as it was."""
    w0 = torch.randn(ROWS, DIM)
    p = torch.nn.Parameter(w0.clone())
    opt = RowSparseOptimizer([p], algo="sgd", lr=0.1, momentum=0.9)
    _run(p, opt, range(3))
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = RowSparseOptimizer([p2], algo="sgd", lr=0.1, momentum=0.9)
    opt2.load_state_dict(_round_trip(opt.state_dict()))
    assert torch.equal(opt2.state[p2]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert "row_step" not in opt2.state[p2]
