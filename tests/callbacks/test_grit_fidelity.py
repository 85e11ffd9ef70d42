"""GRIT's defaults against the paper's equations, computed independently in float64.

One GRIT layer y = W x + s B A x (d_in 32, d_out 24, r 6, s = alpha/r) with fixed inputs x and
a fixed upstream gradient g = dL/dy (the loss is sum(y * g)), trained one SGD step through a
real Lightning Trainer with the default GRIT callbacks. The reference follows docs/grit.md,
"Equations", written out here from scratch (no fteval code on the reference side):

    u = A x, v = B^T g                        per token, real tokens only in the statistics
    dB = s sum_t g u^T, dA = s sum_t v x^T    over every position the loss covers
    clip: (dA, dB) *= min(1, c / ||(dA, dB)||)   c = 1.0, before preconditioning (reference)
    S_a = mean u u^T, S_g = mean v v^T        first step: the mean of this step's tokens
    dB <- dB (S_g + l I)^-1, dA <- (S_a + l I)^-1 dA     l = 1e-2 absolute, no rescaling
    A1 = A - lr dA, B1 = B - lr dB            SGD
    A2 = V_a V_a^T A1, B2 = B1 V_g V_g^T      V = top-4 eigenvectors of S_a, S_g

Tolerances: fteval computes in fp32 (unit round-off eps = 2^-24 ~ 6e-8). A linear solve with a
matrix of condition number kappa loses at most ~kappa * eps relatively, and the sums over
<= 32 terms add ~32 eps; the checks allow 100 * kappa * eps relative to the largest entry,
with kappa computed from the float64 factors. A projector onto the top-k eigenvectors moves
by ~eps ||S|| / gap under a perturbation of S of size eps ||S|| (Davis-Kahan), gap =
lambda_k - lambda_{k+1}; the checks allow 100 times that.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from callbacks.kfac import KFACPreconditioner
from callbacks.regularisers import GeometryRegulariser
from callbacks.reprojection import NeuralReprojection
from fteval.grit import GritLoraLinear

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
D_IN, D_OUT, R, ALPHA, LR = 32, 24, 6, 12.0, 0.1
EPS32 = 2.0**-24


class Probe(L.LightningModule):
    """One GritLoraLinear; records A, B before the step, the gradients the optimizer saw, and A, B after it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.layer = GritLoraLinear(nn.Linear(D_IN, D_OUT), r=R, alpha=ALPHA)
        with torch.no_grad():
            self.layer.lora_A.weight.copy_(torch.randn(R, D_IN, generator=g) / D_IN**0.5)
            self.layer.lora_B.weight.copy_(0.3 * torch.randn(D_OUT, R, generator=g))
        for p in self.layer.base_layer.parameters():
            p.requires_grad_(False)
        self.seen: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.seen["A0"] = self.layer.lora_A.weight.detach().clone()
        self.seen["B0"] = self.layer.lora_B.weight.detach().clone()
        return (self.layer(batch["x"]) * batch["g"]).sum()  # dL/dy = g exactly

    def before_inner_step(self, *_):  # after GRIT's clip and preconditioning: what SGD will use
        self.seen["dA"] = self.layer.lora_A.weight.grad.detach().clone()
        self.seen["dB"] = self.layer.lora_B.weight.grad.detach().clone()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([self.layer.lora_A.weight, self.layer.lora_B.weight], lr=LR)
        optimizer.register_step_pre_hook(self.before_inner_step)
        return optimizer


def fixed_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    labels = torch.full((2, 9), -100)
    labels[0, 3:] = 1  # row 0: positions 2..7 predict a loss token
    labels[1, 5:8] = 1  # row 1: positions 4..6
    return {"x": torch.randn(2, 9, D_IN, generator=g), "g": torch.randn(2, 9, D_OUT, generator=g), "labels": labels}


def default_callbacks(**kfac) -> list[L.Callback]:
    """The GRIT defaults; only the schedule is set so that one step on 9 tokens refreshes and reprojects."""
    return [
        GeometryRegulariser(),
        KFACPreconditioner(min_samples=1, update_freq=1, **kfac),
        NeuralReprojection(min_samples=1, every_n_steps=1),
    ]


def run(callbacks) -> tuple[Probe, L.Trainer]:
    probe = Probe()
    trainer = L.Trainer(max_steps=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        log_every_n_steps=1)
    trainer.fit(probe, DataLoader([fixed_batch()], batch_size=None))
    return probe, trainer


def reference(A: torch.Tensor, B: torch.Tensor, pairing: str = "grit") -> dict[str, torch.Tensor]:
    """The equations of the module docstring in float64, from the batch and the initial A, B."""
    batch = fixed_batch()
    A, B = A.double(), B.double()
    x = batch["x"].double().reshape(-1, D_IN)  # [T, d_in]
    g = batch["g"].double().reshape(-1, D_OUT)  # [T, d_out]
    labels = batch["labels"]
    real = torch.zeros_like(labels, dtype=torch.bool)
    real[:, :-1] = labels[:, 1:] != -100  # position t predicts labels[t + 1]
    real = real.reshape(-1)
    s = ALPHA / R
    u, v = x @ A.T, g @ B  # [T, r]: u = A x, v = B^T g per token
    dB, dA = s * g.T @ u, s * v.T @ x  # [d_out, r], [r, d_in]
    norm = torch.sqrt((dA**2).sum() + (dB**2).sum())
    clip = min(1.0, 1.0 / float(norm))
    dA, dB = dA * clip, dB * clip
    ur, vr = u[real], v[real]
    S_a, S_g = ur.T @ ur / len(ur), vr.T @ vr / len(vr)
    eye = torch.eye(R, dtype=torch.float64)
    M_a, M_g = S_a + 1e-2 * eye, S_g + 1e-2 * eye
    M_B, M_A = (M_g, M_a) if pairing == "grit" else (M_a, M_g)
    dB_pre = torch.linalg.solve(M_B, dB.T).T  # dB M^-1 (M symmetric)
    dA_pre = torch.linalg.solve(M_A, dA)  # M^-1 dA
    A1, B1 = A - LR * dA_pre, B - LR * dB_pre
    _, V_a = torch.linalg.eigh(S_a)  # ascending
    _, V_g = torch.linalg.eigh(S_g)
    P_a, P_g = V_a[:, -4:] @ V_a[:, -4:].T, V_g[:, -4:] @ V_g[:, -4:].T
    kappa = max(float(torch.linalg.cond(M_a)), float(torch.linalg.cond(M_g)))
    ev_a, ev_g = torch.linalg.eigvalsh(S_a).flip(0), torch.linalg.eigvalsh(S_g).flip(0)
    rel_gap = min(float((ev_a[3] - ev_a[4]) / ev_a[0]), float((ev_g[3] - ev_g[4]) / ev_g[0]))
    return {"dA": dA_pre, "dB": dB_pre, "A": P_a @ A1, "B": B1 @ P_g, "S_a": S_a, "S_g": S_g, "clip": clip,
            "kappa": kappa, "rel_gap": rel_gap, "raw_dA": dA, "raw_dB": dB}


def close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got.double(), ref, rtol=0.0, atol=rel * float(ref.abs().max()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum() / (a.double().norm() * b.double().norm()))


def test_default_grit_step_equals_the_equations_in_float64():
    probe, trainer = run(default_callbacks())
    ref = reference(probe.seen["A0"], probe.seen["B0"])
    assert ref["clip"] < 0.5  # the clip before preconditioning is exercised
    tol = 100 * ref["kappa"] * EPS32
    assert tol < 1e-3  # a well-conditioned probe, so the check is tight
    close(probe.layer.stats.S_a, ref["S_a"], 100 * EPS32)
    close(probe.layer.stats.S_g, ref["S_g"], 100 * EPS32)
    close(probe.seen["dA"], ref["dA"], tol)
    close(probe.seen["dB"], ref["dB"], tol)
    for raw, pre in (("raw_dA", "dA"), ("raw_dB", "dB")):  # preconditioning really changed the direction
        assert cosine(ref[raw], ref[pre]) < 0.99
    proj_tol = 100 * EPS32 / ref["rel_gap"]
    assert proj_tol < 1e-3
    close(probe.layer.lora_A.weight.detach(), ref["A"], max(tol, proj_tol))
    close(probe.layer.lora_B.weight.detach(), ref["B"], max(tol, proj_tol))
    metrics = trainer.callback_metrics  # modules actually preconditioned, not hook calls
    assert float(metrics["grit/preconditioned_layers"]) == 1.0 and float(metrics["grit/preconditioned_grads"]) == 2.0
    assert float(metrics["grit/reprojected_layers"]) == 1.0


def test_default_update_differs_from_the_textbook_pairing():
    """A silent switch of the default back to the textbook pairing fails here."""
    default, _ = run(default_callbacks())
    textbook, _ = run(default_callbacks(pairing="kfac"))
    ref_grit = reference(default.seen["A0"], default.seen["B0"], "grit")
    ref_kfac = reference(default.seen["A0"], default.seen["B0"], "kfac")
    tol = 100 * ref_grit["kappa"] * EPS32
    close(textbook.seen["dA"], ref_kfac["dA"], tol)  # the variant is the textbook equations
    close(textbook.seen["dB"], ref_kfac["dB"], tol)
    for key in ("dA", "dB"):
        assert cosine(default.seen[key], textbook.seen[key]) < 0.95, key
        assert cosine(ref_grit[key], ref_kfac[key]) < 0.95, key


@pytest.mark.parametrize("variant", [{"damping_mode": "trace"}, {"preserve_grad_norm": True}, {"clip_grad_norm": None}])
def test_each_variant_changes_the_default_update(variant):
    default, _ = run(default_callbacks())
    other, _ = run(default_callbacks(**variant))
    diff = max(float((default.seen[k] - other.seen[k]).abs().max() / default.seen[k].abs().max()) for k in ("dA", "dB"))
    assert diff > 1e-2, variant


@pytest.mark.parametrize("path", ["configs/grit.yaml", "configs/llama3-8b/grit.yaml"])
def test_grit_configs_use_the_constructor_defaults(path):
    """Both GRIT configs state GRIT's defaults: the choices the fidelity test checks, and the regulariser on."""
    config = yaml.safe_load((REPO / path).read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    kfac, reg, reproj = KFACPreconditioner(), GeometryRegulariser(), NeuralReprojection()
    for key in ("pairing", "damping", "damping_mode", "preserve_grad_norm", "clip_grad_norm", "clip_stage", "ema_decay",
                "factor_average", "statistics_tokens", "inverse_timing"):
        assert callbacks["KFACPreconditioner"][key] == getattr(kfac, key), key
    for key in ("curvature_weight", "reprojection_weight", "warmup_steps", "form"):
        assert callbacks["GeometryRegulariser"][key] == getattr(reg, key), key
    for key in ("top_k", "two_sided", "dynamic_rank", "project_moments"):
        assert callbacks["NeuralReprojection"][key] == getattr(reproj, key), key
    assert config["trainer"]["gradient_clip_val"] is None  # clipping happens before preconditioning
    assert (kfac.pairing, kfac.damping_mode, kfac.damping, kfac.preserve_grad_norm) == ("grit", "absolute", 0.01, False)
    assert (reg.curvature_weight, reg.reprojection_weight) == (1e-5, 1e-4)
    if "llama3-8b" in path:  # the spec's schedule at paper scale
        assert callbacks["KFACPreconditioner"]["update_freq"] == 20 == kfac.update_freq
        assert callbacks["NeuralReprojection"]["every_n_steps"] == 40 == reproj.every_n_steps
