"""GRIT's geometry regularisers: exact gradients against autograd, warm-up, off-by-default, order and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.kfac import KFACPreconditioner
from callbacks.regularisers import GeometryRegulariser
from callbacks.reprojection import NeuralReprojection
from fteval.models.grit_layer import GritLoraLinear
from tests.callbacks.test_reprojection import TinyGrit, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_with_stats(seed: int = 0) -> tuple[GritLoraLinear, KFACPreconditioner]:
    torch.manual_seed(seed)
    layer = GritLoraLinear(nn.Linear(7, 5), r=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    cb = KFACPreconditioner(min_samples=1, update_freq=100)
    cb.attach(layer)
    cb.begin_micro_batch(None)
    layer(torch.randn(9, 7)).pow(2).sum().backward()
    cb.optimizer_step_work(None)
    return layer, cb


def test_curvature_gradient_equals_autograd_of_the_penalty():
    layer, _ = layer_with_stats()
    reg = GeometryRegulariser(curvature_weight=0.3)
    reg._layers = {"": layer}
    before = layer.lora_B.weight.grad.clone()
    a_before = layer.lora_A.weight.grad.clone()
    values = reg.apply(step=0)
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    S_a = layer.stats.S_a.detach()
    assert float(torch.trace(S_a)) > 0
    penalty = 0.5 * layer.scaling**2 * torch.trace(B @ S_a @ B.T)  # 1/2 s^2 tr(B S_a B^T)
    (g,) = torch.autograd.grad(0.3 * penalty, B)
    torch.testing.assert_close(layer.lora_B.weight.grad - before, g, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.lora_A.weight.grad, a_before)  # curvature acts on B only
    assert float(values["grit/reg_curvature"]) == pytest.approx(0.3 * float(penalty), rel=1e-5)
    assert "grit/reg_reprojection" not in values  # no reprojection callback: no subspaces


def test_reprojection_gradient_pulls_towards_the_kept_subspace():
    layer, _ = layer_with_stats(1)
    reproj = NeuralReprojection(top_k=2, min_samples=1)
    assert reproj.reproject(layer) == 1
    ((V_a, V_g),) = reproj.subspaces().values()
    assert V_a.shape == V_g.shape == (3, 2)
    with torch.no_grad():  # move A and B off the subspace again, as training between reprojections does
        layer.lora_A.weight.add_(0.1 * torch.randn_like(layer.lora_A.weight))
        layer.lora_B.weight.add_(0.1 * torch.randn_like(layer.lora_B.weight))
    layer.lora_A.weight.grad = torch.zeros_like(layer.lora_A.weight)
    layer.lora_B.weight.grad = torch.zeros_like(layer.lora_B.weight)
    reg = GeometryRegulariser(reprojection_weight=2.0)
    reg._layers, reg._reprojection = {"": layer}, reproj
    values = reg.apply(step=5, period=reproj.period)
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    P_a, P_g = V_a @ V_a.T, V_g @ V_g.T
    penalty = 0.5 * (((torch.eye(3) - P_a) @ A).pow(2).sum() + (B @ (torch.eye(3) - P_g)).pow(2).sum())
    gA, gB = torch.autograd.grad(2.0 * penalty, (A, B))
    torch.testing.assert_close(layer.lora_A.weight.grad, gA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, gB, rtol=1e-5, atol=1e-6)
    assert float(values["grit/reg_reprojection"]) == pytest.approx(2.0 * float(penalty), rel=1e-5)
    assert float(penalty) > 1e-4


def test_warmup_ramps_linearly_and_zero_weights_change_nothing():
    reg = GeometryRegulariser(curvature_weight=1.0, warmup_steps=4)
    assert [reg.ramp(s) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    layer, _ = layer_with_stats(2)
    reg._layers = {"": layer}
    grads = (layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    reg.apply(step=0)  # ramp 0: nothing added
    assert torch.equal(layer.lora_A.weight.grad, grads[0]) and torch.equal(layer.lora_B.weight.grad, grads[1])
    reg.apply(step=2)
    half = layer.lora_B.weight.grad - grads[1]
    layer.lora_B.weight.grad = grads[1].clone()
    reg.apply(step=4)
    torch.testing.assert_close(layer.lora_B.weight.grad - grads[1], 2 * half)
    off = GeometryRegulariser()
    assert not off.active


def test_fit_with_regularisers_differs_from_fit_without():
    def run(reg):
        module = TinyGrit()
        callbacks = ([reg] if reg is not None else []) + [
            KFACPreconditioner(min_samples=1, update_freq=1), NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1)
        ]
        fit(module, callbacks, steps=4, log_every_n_steps=1)
        return module, {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}

    _, plain = run(None)
    _, zero = run(GeometryRegulariser())  # off by default: identical training
    module, on = run(GeometryRegulariser(curvature_weight=1.0, reprojection_weight=1.0, warmup_steps=1))
    assert all(torch.equal(plain[n], zero[n]) for n in plain)
    assert max(float((plain[n] - on[n]).abs().max()) for n in plain) > 1e-5
    metrics = module.trainer.callback_metrics
    assert float(metrics["grit/reg_curvature"]) > 0 and float(metrics["grit/reg_reprojection"]) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"curvature_weight": -1.0}, "curvature_weight"), ({"reprojection_weight": "a"}, "reprojection_weight"),
     ({"warmup_steps": -2}, "warmup_steps")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeometryRegulariser(**kwargs)


def test_wrong_order_or_missing_partner_callbacks_are_refused():
    with pytest.raises(ValueError, match="must come before callbacks.kfac.KFACPreconditioner"):
        fit(TinyGrit(), [KFACPreconditioner(min_samples=1), GeometryRegulariser(curvature_weight=1.0)], steps=1)
    with pytest.raises(ValueError, match="NeuralReprojection"):
        fit(TinyGrit(), [GeometryRegulariser(reprojection_weight=1.0), KFACPreconditioner(min_samples=1)], steps=1)
