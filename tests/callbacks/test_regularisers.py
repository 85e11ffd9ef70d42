"""GRIT's geometry regularisers: exact gradients against float64 references, warm-up, the reference's
default weights and errors. Tests that need no Trainer use the plain-torch
:class:`fteval.grit.GeometryPenalties` that the callback adds its hooks to.

Tolerances: the penalties are computed in fp32 (unit round-off eps = 2^-24). An entry of a product
X Y with inner dimension r carries at most ~r eps (|X| |Y|) of round-off (the standard bound),
and a difference X - P X one more eps |X|; the checks allow 4 times that bound, computed from
the operands, so they hold on any CPU, thread count or BLAS path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.kfac import KFACPreconditioner
from callbacks.regularisers import GeometryRegulariser
from callbacks.reprojection import NeuralReprojection
from fteval.grit import KFAC, GeometryPenalties, GritLoraLinear, Reprojection
from tests.callbacks.test_reprojection import TinyGrit, fit

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = 2.0**-24


def layer_with_stats(seed: int = 0) -> tuple[GritLoraLinear, KFAC]:
    torch.manual_seed(seed)
    layer = GritLoraLinear(nn.Linear(7, 5), r=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    cb = KFAC(min_samples=1, update_freq=100)
    cb.attach(layer)
    cb.begin_micro_batch(None)
    layer(torch.randn(9, 7)).pow(2).sum().backward()
    cb.optimizer_step_work(None)
    return layer, cb


def test_curvature_gradient_equals_autograd_of_the_penalty_energy_form():
    layer, _ = layer_with_stats()
    reg = GeometryPenalties(curvature_weight=0.3, reprojection_weight=0.0, form="energy")
    reg.attach(layer)
    before = layer.lora_B.weight.grad.clone()
    a_before = layer.lora_A.weight.grad.clone()
    values = reg.apply(step=0)
    B = layer.lora_B.weight.detach().double().requires_grad_()
    S_a = layer.stats.S_a.detach().double()
    assert float(torch.trace(S_a)) > 0
    s2 = layer.scaling**2
    penalty = 0.5 * s2 * torch.trace(B @ S_a @ B.T)  # 1/2 s^2 tr(B S_a B^T), float64
    (g,) = torch.autograd.grad(0.3 * penalty, B)
    bound = 0.3 * s2 * (B.detach().abs() @ S_a.abs())  # |B| |S_a|: the scale of each entry's round-off
    r = S_a.shape[0]
    # the new grad is before + g in fp32: one more rounding of the sum
    atol = 4 * r * EPS32 * float(bound.max()) + 4 * EPS32 * float((before.abs() + g.abs()).max())
    torch.testing.assert_close((layer.lora_B.weight.grad - before).double(), g, rtol=0.0, atol=atol)
    assert torch.equal(layer.lora_A.weight.grad, a_before)  # curvature acts on B only
    # the penalty's fp32 sum over out x r terms: ~(out r) eps relative
    assert float(values["grit/reg_curvature"]) == pytest.approx(0.3 * float(penalty.detach()), rel=4 * B.numel() * EPS32)
    assert "grit/reg_reprojection" not in values  # no reprojection yet: no subspaces


def test_curvature_gradient_equals_autograd_of_the_penalty_reference_form():
    """The default: the reference's tr(A^T S_a A) + tr(B S_g B^T), on both factors."""
    layer, _ = layer_with_stats()
    reg = GeometryPenalties(curvature_weight=0.3, reprojection_weight=0.0)
    assert reg.form == "reference"
    reg.attach(layer)
    before = (layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    values = reg.apply(step=0)
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    S_a, S_g = layer.stats.S_a.detach().double(), layer.stats.S_g.detach().double()
    assert float(torch.trace(S_a)) > 0 and float(torch.trace(S_g)) > 0
    penalty = torch.trace(A.T @ S_a @ A) + torch.trace(B @ S_g @ B.T)
    gA, gB = torch.autograd.grad(0.3 * penalty, (A, B))
    r = S_a.shape[0]
    for got, prev, ref, bound in (
        (layer.lora_A.weight.grad, before[0], gA, 0.6 * (S_a.abs() @ A.detach().abs())),
        (layer.lora_B.weight.grad, before[1], gB, 0.6 * (B.detach().abs() @ S_g.abs())),
    ):
        atol = 4 * r * EPS32 * float(bound.max()) + 4 * EPS32 * float((prev.abs() + ref.abs()).max())
        torch.testing.assert_close((got - prev).double(), ref, rtol=0.0, atol=atol)
    n = A.numel() + B.numel()
    assert float(values["grit/reg_curvature"]) == pytest.approx(0.3 * float(penalty.detach()), rel=4 * n * EPS32)


@pytest.mark.parametrize("form, half", [("reference", 1.0), ("energy", 0.5)])
def test_reprojection_gradient_pulls_towards_the_kept_subspace(form, half):
    layer, _ = layer_with_stats(1)
    reproj = Reprojection(top_k=2, min_samples=1)
    assert reproj.reproject(layer) == 1
    ((V_a, V_g),) = reproj.subspaces().values()
    assert V_a.shape == V_g.shape == (3, 2)
    with torch.no_grad():  # move A and B off the subspace again, as training between reprojections does
        layer.lora_A.weight.add_(0.1 * torch.randn_like(layer.lora_A.weight))
        layer.lora_B.weight.add_(0.1 * torch.randn_like(layer.lora_B.weight))
    layer.lora_A.weight.grad = torch.zeros_like(layer.lora_A.weight)
    layer.lora_B.weight.grad = torch.zeros_like(layer.lora_B.weight)
    reg = GeometryPenalties(curvature_weight=0.0, reprojection_weight=2.0, form=form)
    reg.attach(layer)  # the subspaces are read from the layer, where the reprojection left them
    values = reg.apply(step=5)
    A = layer.lora_A.weight.detach().double().requires_grad_()
    B = layer.lora_B.weight.detach().double().requires_grad_()
    V_a, V_g = V_a.double(), V_g.double()  # the subspaces the penalty used (fp32 eigh), exactly
    P_a, P_g = V_a @ V_a.T, V_g @ V_g.T
    eye = torch.eye(3, dtype=torch.float64)
    penalty = half * (((eye - P_a) @ A).pow(2).sum() + (B @ (eye - P_g)).pow(2).sum())
    gA, gB = torch.autograd.grad(2.0 * penalty, (A, B))
    # fp32 P = V V^T (inner dim k = 2), then P A (inner dim r = 3) and A - P A: bound 4 (k + r + 1) eps |P| |A|
    r = 3
    for got, ref, bound in ((layer.lora_A.weight.grad, gA, P_a.abs() @ A.detach().abs() + A.detach().abs()),
                            (layer.lora_B.weight.grad, gB, B.detach().abs() @ P_g.abs() + B.detach().abs())):
        atol = 2.0 * 4 * (2 + r + 1) * EPS32 * float(bound.max())
        torch.testing.assert_close(got.double(), ref, rtol=0.0, atol=atol)
    # the penalty is a sum of squares of those residuals (entries ~1e-1, moved by 0.1 N(0, 1) above; round-off
    # <= ~1e-6 each): relative error <= ~2e-5, checked at 1e-4
    assert float(values["grit/reg_reprojection"]) == pytest.approx(2.0 * float(penalty), rel=1e-4)
    assert float(penalty) > 1e-4


def test_warmup_ramps_linearly_and_zero_weights_change_nothing():
    reg = GeometryPenalties(curvature_weight=1.0, warmup_steps=4)
    assert [reg.ramp(s) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    layer, _ = layer_with_stats(2)
    reg.attach(layer)
    grads = (layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    reg.apply(step=0)  # ramp 0: nothing added
    assert torch.equal(layer.lora_A.weight.grad, grads[0]) and torch.equal(layer.lora_B.weight.grad, grads[1])
    reg.apply(step=2)
    half = layer.lora_B.weight.grad - grads[1]
    layer.lora_B.weight.grad = grads[1].clone()
    reg.apply(step=4)
    # (grad + 2h) - grad against 2 (grad + h - grad): the two fp32 sums round differently by ~eps |grad|
    atol = 8 * EPS32 * float((grads[1].abs() + 2 * half.abs()).max())
    torch.testing.assert_close(layer.lora_B.weight.grad - grads[1], 2 * half, rtol=0.0, atol=atol)
    assert not GeometryRegulariser(curvature_weight=0.0, reprojection_weight=0.0).active


def test_defaults_are_the_reference_weights():
    reg = GeometryRegulariser()
    assert reg.active and (reg.curvature_weight, reg.reprojection_weight, reg.warmup_steps) == (1e-5, 1e-4, 0)


def test_fit_with_regularisers_differs_from_fit_without():
    def run(reg):
        module = TinyGrit()
        callbacks = ([reg] if reg is not None else []) + [
            KFACPreconditioner(min_samples=1, update_freq=1), NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1)
        ]
        fit(module, callbacks, steps=4, log_every_n_steps=1)
        return module, {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}

    _, plain = run(None)
    _, zero = run(GeometryRegulariser(curvature_weight=0.0, reprojection_weight=0.0))  # off: identical training
    module, on = run(GeometryRegulariser(curvature_weight=1.0, reprojection_weight=1.0, warmup_steps=1))
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    assert max(float((plain[n] - on[n]).abs().max()) for n in plain) > 1e-5
    metrics = module.trainer.callback_metrics
    assert float(metrics["grit/reg_curvature"]) > 0 and float(metrics["grit/reg_reprojection"]) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"curvature_weight": -1.0}, "curvature_weight"), ({"reprojection_weight": "a"}, "reprojection_weight"),
     ({"warmup_steps": -2}, "warmup_steps"), ({"form": "half"}, "form")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeometryRegulariser(**kwargs)
    with pytest.raises(ValueError, match=match):
        GeometryPenalties(**kwargs)


def test_missing_partner_callbacks_are_refused():
    with pytest.raises(ValueError, match="needs callbacks.kfac.KFACPreconditioner"):
        fit(TinyGrit(), [GeometryRegulariser(curvature_weight=1.0), NeuralReprojection()], steps=1)
    with pytest.raises(ValueError, match="NeuralReprojection"):
        fit(TinyGrit(), [GeometryRegulariser(reprojection_weight=1.0), KFACPreconditioner(min_samples=1)], steps=1)
    with pytest.raises(ValueError, match="no GRIT layers"):
        GeometryPenalties().attach(nn.Linear(2, 2))
