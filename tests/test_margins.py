"""Margin objects on their own: formulas, the θ + m > π handling, gradients, statistics.

(The margins inside the full head against a dense float64 reference — loss and gradients with
respect to embeddings and centres, one to four ranks — are in test_partial_fc.py.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from megaclass.training.heads import step_generator
from megaclass.training.margins import (
    MARGINS,
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    ElasticFace,
    make_margin,
)


def _cos_grid(n: int = 401) -> torch.Tensor:
    return torch.linspace(-0.999, 0.999, n, dtype=torch.float64)


def _grad(fn, c: torch.Tensor) -> torch.Tensor:
    c = c.clone().requires_grad_(True)
    fn(c).sum().backward()
    return c.grad


def test_arcface_value_and_true_gradient():
    m = 0.5
    arc = ArcFace(scale=64, m=m)
    c = _cos_grid()
    th = torch.acos(c)
    inside = th + m <= math.pi
    expect = torch.where(inside, torch.cos(th + m), c - m * math.sin(m))
    assert torch.allclose(arc(c), expect, atol=1e-12)
    # d/dc cos(acos c + m) = cos m + sin m · c / sqrt(1 − c²); the fallback line has slope 1.
    slope = torch.where(inside, math.cos(m) + math.sin(m) * c / torch.sqrt(1 - c * c), 1.0)
    assert torch.allclose(_grad(arc, c), slope, atol=1e-9)
    assert torch.autograd.gradcheck(
        arc, (torch.tensor([0.3, -0.2, 0.9], dtype=torch.float64, requires_grad=True),)
    )


def test_arcface_fallback_keeps_it_monotonic():
    for m in (0.3, 0.5, 0.8):
        v = ArcFace(m=m)(_cos_grid(2001))
        assert bool((v[1:] >= v[:-1] - 1e-12).all()), m
        # Without the fallback cos(θ + m) would turn back up near c = −1.
        th = torch.acos(_cos_grid(2001))
        raw = torch.cos(th + m)
        assert not bool((raw[1:] >= raw[:-1] - 1e-12).all())


def test_arcface_detached_has_plain_cosine_gradient():
    c = _cos_grid()
    true, det = ArcFace(m=0.5), make_margin("arcface_detached", m=0.5)
    assert isinstance(det, ArcFace) and det.detached
    assert torch.allclose(det(c), true(c), atol=1e-15)
    assert torch.equal(_grad(det, c), torch.ones_like(c))
    assert not torch.allclose(_grad(true, c), torch.ones_like(c))


def test_cosface_and_combined_special_cases():
    c = _cos_grid()
    assert torch.allclose(CosFace(m=0.35)(c), c - 0.35)
    assert torch.equal(_grad(CosFace(m=0.35), c), torch.ones_like(c))
    # combined(1, 0, m3) = CosFace; combined(1, m2, 0) = ArcFace where θ + m2 ≤ π.
    assert torch.allclose(CombinedMargin(m1=1.0, m2=0.0, m3=0.35)(c), c - 0.35, atol=1e-6)
    inside = torch.acos(c) + 0.5 <= math.pi
    comb, arc = CombinedMargin(m1=1.0, m2=0.5, m3=0.0)(c), ArcFace(m=0.5)(c)
    assert torch.allclose(comb[inside], arc[inside], atol=1e-6)


def test_combined_is_continuous_and_monotonic_past_pi():
    cm = CombinedMargin(m1=1.2, m2=0.3, m3=0.1)
    th_star = (math.pi - 0.3) / 1.2
    c_star = math.cos(th_star)
    eps = 1e-7
    lo, hi = cm(torch.tensor([c_star - eps, c_star + eps], dtype=torch.float64))
    assert abs(float(hi - lo)) < 1e-5
    v = cm(_cos_grid(2001))
    assert bool((v[1:] >= v[:-1] - 1e-12).all())
    g = _grad(cm, _cos_grid())
    assert torch.isfinite(g).all()


def test_adaface_statistics_and_formula():
    ada = AdaFace(scale=64, m=0.4, h=0.333, t_alpha=0.01)
    norms = torch.tensor([5.0, 20.0, 40.0, 80.0], dtype=torch.float64)
    gen = step_generator(0, 0, 0, 0)
    z = ada.prepare(norms=norms, cos_target=None, generator=gen)
    mean = 0.99 * 20 + 0.01 * norms.mean()
    std = 0.99 * 100 + 0.01 * norms.std()
    assert torch.isclose(ada.batch_mean, mean) and torch.isclose(ada.batch_std, std)
    expect_z = (0.333 * (norms - mean) / (std + 1e-3)).clamp(-1, 1)
    assert torch.allclose(z, expect_z)
    c = torch.tensor([0.1, 0.5, -0.3, 0.8], dtype=torch.float64)
    th = (torch.acos(c) - 0.4 * expect_z).clamp(1e-3, math.pi - 1e-3)
    assert torch.allclose(ada(c, z), torch.cos(th) - 0.4 - 0.4 * expect_z)
    # Higher-norm (better quality) samples get a harder target.
    assert bool((ada(c.new_full((4,), 0.5), z).diff() < 0).all())
    # eval(): statistics frozen.
    ada.eval()
    before = ada.batch_mean.clone()
    ada.prepare(norms=norms * 3, cos_target=None, generator=gen)
    assert torch.equal(ada.batch_mean, before)
    assert "batch_mean" in ada.state_dict()


def test_elastic_margins_random_but_reproducible():
    el = ElasticFace(m=0.5, std=0.05, kind="arc")
    norms = torch.ones(4000, dtype=torch.float64)
    a = el.prepare(norms=norms, cos_target=None, generator=step_generator(1, 2, 0, 0))
    b = el.prepare(norms=norms, cos_target=None, generator=step_generator(1, 2, 0, 0))
    c = el.prepare(norms=norms, cos_target=None, generator=step_generator(1, 3, 0, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item() - 0.5) < 0.005 and abs(a.std().item() - 0.05) < 0.005
    cos = torch.full((4000,), 0.2, dtype=torch.float64)
    el_cos = make_margin("elastic_cos", m=0.35, std=0.05)
    m = el_cos.prepare(norms=norms, cos_target=None, generator=step_generator(0, 0, 0, 0))
    assert torch.allclose(el_cos(cos, m), cos - m)


def test_elastic_plus_gives_easy_samples_small_margins():
    el = make_margin("elastic_cos_plus", m=0.35, std=0.05)
    assert el.needs_global_cos
    cos = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = el.prepare(norms=torch.ones(64), cos_target=cos, generator=step_generator(0, 1, 0, 0))
    order = torch.argsort(cos, descending=True)
    assert bool((m[order].diff() >= 0).all())  # higher cosine -> smaller margin
    plain = ElasticFace(m=0.35, std=0.05, kind="cos")
    same = plain.prepare(
        norms=torch.ones(64), cos_target=None, generator=step_generator(0, 1, 0, 0)
    )
    assert torch.equal(torch.sort(m).values, torch.sort(same).values)  # same draws, re-assigned
    with pytest.raises(ValueError, match="target cosines"):
        el.prepare(norms=torch.ones(4), cos_target=None, generator=step_generator(0))


@pytest.mark.parametrize("name", MARGINS)
def test_make_margin_every_name_has_finite_gradients(name):
    mg = make_margin(name, scale=30.0)
    assert mg.scale == 30.0
    c = _cos_grid(64).requires_grad_(True)
    params = mg.prepare(
        norms=torch.linspace(1, 50, 64, dtype=torch.float64),
        cos_target=c.detach(),
        generator=step_generator(0, 0, 0, 0),
    )
    out = mg(c, params)
    out.sum().backward()
    assert out.shape == c.shape and torch.isfinite(out).all() and torch.isfinite(c.grad).all()


def test_make_margin_errors():
    with pytest.raises(ValueError, match="unknown margin 'sphereface'.*arcface"):
        make_margin("sphereface")
    with pytest.raises(ValueError, match="m must be in"):
        make_margin("arcface", m=4.0)
    assert make_margin("combined", m=0.3).m2 == 0.3


# --- every margin setting from the config ---------------------------------------------------


def _head(*overrides: str, n: int = 8):
    from megaclass.pipelines.config import load_config
    from megaclass.training.config import TrainJob
    from megaclass.training.engine import DistEnv
    from megaclass.training.trainer import build_head

    cfg = load_config(None, ["train.embed_dim=4", *overrides])
    job = TrainJob(cfg.train, cfg.data, cfg.seed, Path("/nonexistent"), num_classes=n)
    return build_head(job, DistEnv(0, 0, 1, torch.device("cpu"), "gloo"), n)


def test_combined_m1_m3_reach_the_loss_as_the_formula_says() -> None:
    mg = _head(
        "train.margin=combined", "train.margin_m=0.3", "train.margin_m1=0.9", "train.margin_m3=0.2"
    ).margin
    cos_t = torch.tensor([0.9, 0.5, -0.2], dtype=torch.float64)
    want = torch.cos(0.9 * torch.acos(cos_t) + 0.3) - 0.2
    torch.testing.assert_close(mg(cos_t), want)
    base = _head("train.margin=combined", "train.margin_m=0.3").margin
    assert (base.m1, base.m3) == (1.0, 0.0)


@pytest.mark.parametrize(
    "name, std",
    [
        ("elastic_arc", 0.05),
        ("elastic_cos", 0.05),
        ("elastic_arc_plus", 0.0175),
        ("elastic_cos_plus", 0.02),
    ],
)
def test_elastic_sigma_defaults_to_the_papers_and_can_be_set(name: str, std: float) -> None:
    mg = _head(f"train.margin={name}", "train.margin_m=0.4").margin
    assert mg.std == pytest.approx(std)
    g = torch.Generator().manual_seed(0)
    drawn = mg.prepare(norms=torch.ones(20000), cos_target=torch.rand(20000), generator=g)
    assert float(drawn.mean()) == pytest.approx(0.4, abs=3 * std / 100 + 1e-4)
    assert float(drawn.std()) == pytest.approx(std, rel=0.05)
    assert _head(f"train.margin={name}", "train.elastic_std=0.1").margin.std == pytest.approx(0.1)


def test_adaface_h_and_t_alpha_and_interclass_threshold_are_passed() -> None:
    mg = _head("train.margin=adaface", "train.adaface_h=0.5", "train.adaface_t_alpha=0.1").margin
    assert (mg.h, mg.t_alpha) == (0.5, 0.1)
    head = _head("train.interclass_threshold=0.4")
    assert head.interclass_threshold == 0.4


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.margin_m1=0.9"], "train.margin_m1"),
        (["train.elastic_std=0.02"], "train.elastic_std"),
        (["train.adaface_h=0.5"], "train.adaface_h"),
        (["train.objective=mlcd", "train.interclass_threshold=0.4"], "train.interclass_threshold"),
        (["train.margin=combined", "train.margin_m1=0"], "train.margin_m1"),
        (["train.margin=adaface", "train.adaface_t_alpha=0"], "train.adaface_t_alpha"),
    ],
)
def test_margin_settings_the_margin_ignores_or_invalid_are_config_errors(overrides, key) -> None:
    from megaclass.core.config import ConfigError
    from megaclass.pipelines.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)
