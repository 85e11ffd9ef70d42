"""The GRIT callbacks train identically in any order in the trainer's list.

The K-FAC callback runs the order-dependent work of a step itself (the regulariser's gradients,
then clip, fold, refresh, precondition); the reprojection acts after the optimizer step on what
that work folded. So every permutation of the three callbacks must give the same parameters,
bit for bit, as the order of configs/grit.yaml.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from callbacks.kfac import KFACPreconditioner
from callbacks.regularisers import GeometryRegulariser
from callbacks.reprojection import NeuralReprojection
from tests.callbacks.test_reprojection import TinyGrit, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def train(order: tuple[int, ...], with_regulariser: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    callbacks = [
        # weights far above the reference's 1e-5 / 1e-4, so the penalties move the parameters visibly
        GeometryRegulariser(curvature_weight=1.0, reprojection_weight=1.0),
        KFACPreconditioner(min_samples=1, update_freq=2),
        NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1, project_moments=True),
    ]
    if not with_regulariser:
        callbacks[0] = GeometryRegulariser(curvature_weight=0.0, reprojection_weight=0.0)
    module = TinyGrit()
    # 4 optimizer steps of 2 micro-batches: two refreshes and two reprojections, the second pulled towards
    trainer = fit(module, [callbacks[i] for i in order], steps=4, n_batches=8, accumulate_grad_batches=2,
                  log_every_n_steps=1)
    params = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grit/reg_")}
    return params, metrics


def test_every_callback_order_trains_bitwise_identically():
    reference, ref_metrics = train((0, 1, 2))  # the order of configs/grit.yaml
    without, _ = train((0, 1, 2), with_regulariser=False)
    assert max(float((reference[n] - without[n]).abs().max()) for n in reference) > 1e-5  # the penalties act
    assert ref_metrics["grit/reg_curvature"] > 0 and ref_metrics["grit/reg_reprojection"] > 0
    for order in itertools.permutations(range(3)):
        if order == (0, 1, 2):
            continue
        params, metrics = train(order)
        assert params.keys() == reference.keys()
        for name in reference:
            assert torch.equal(params[name], reference[name]), (order, name)
        assert metrics == ref_metrics, order
