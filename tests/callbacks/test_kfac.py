"""K-FAC preconditioner: exact maths against a dense solve, hook placement through a real Trainer,
resume, state and errors. The statistics without a Trainer are in test_kfac_statistics.py."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.grit import KFAC, GritLoraLinear, damped_cholesky, grit_layers, inject_grit_layers

REPO = Path(__file__).resolve().parents[2]  # the DDP worker's import root
TARGETS = ["q_proj", "v_proj", "up_proj"]
EPS32 = 2.0**-24  # fp32 unit round-off


def gram_atol(X: torch.Tensor, inner: int) -> float:
    """Round-off bound for an fp32 Gram matrix X^T X of n rows, X itself an fp32 product over ``inner`` terms.

    The standard bound |fl(X^T X) - X^T X| <= n eps |X|^T |X| (entrywise), plus 2 inner eps for
    X's own rounding (computed by another kernel on each side); 4x that, as one number.
    """
    X = X.detach().double().reshape(-1, X.shape[-1])
    return 4 * (X.shape[0] + 2 * inner) * EPS32 * float((X.abs().T @ X.abs()).max())


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def lm_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)  # [batch 2, seq 12]
    labels = ids.clone()
    labels[:, :5] = -100  # prompt: no loss
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # row 1 padded from position 9
    labels[1, 9:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


class TinyGrit(L.LightningModule):
    """Tiny Llama with GRIT layers (B non-zero so both factors carry information from step 0)."""

    def __init__(self, optimizer: str = "adamw", lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_llama()
        inject_grit_layers(self.model, TARGETS, r=4, alpha=8, dropout=0.0)
        for layer in grit_layers(self.model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        self.optimizer_name, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def trainer(max_steps: int, callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("log_every_n_steps", 1)  # the K-FAC callback logs on Lightning's logging steps only
    return L.Trainer(
        max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, **kw,
    )


def loader(n_batches: int = 1) -> DataLoader:
    return DataLoader([lm_batch(seed=i + 1) for i in range(n_batches)], batch_size=None)


def lora_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------- exact maths
class DenseProbe(L.LightningModule):
    """One GritLoraLinear on fixed inputs; records raw grads, u inputs and dL/dy for a dense reference."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = GritLoraLinear(nn.Linear(8, 5), r=3, alpha=6.0)
        for p in self.layer.base_layer.parameters():
            p.requires_grad_(False)
        nn.init.normal_(self.layer.lora_B.weight, std=0.5)
        self.record: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        y = self.layer(batch["x"])  # [2, 6, 5]
        y.retain_grad()
        self.record["y"] = y
        return ((y - batch["t"]) ** 2).mean() + (y**3).mean()

    def on_after_backward(self):
        self.record["g"] = self.record.pop("y").grad.detach().clone()  # dL/dy [2, 6, 5]
        self.record["dA"] = self.layer.lora_A.weight.grad.detach().clone()
        self.record["dB"] = self.layer.lora_B.weight.grad.detach().clone()

    def before_inner_step(self, *_):  # GRIT's step has clipped and preconditioned: what SGD will use
        self.record["dA_pre"] = self.layer.lora_A.weight.grad.detach().clone()
        self.record["dB_pre"] = self.layer.lora_B.weight.grad.detach().clone()
        self.record["A"] = self.layer.lora_A.weight.detach().clone()
        self.record["B"] = self.layer.lora_B.weight.detach().clone()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([self.layer.lora_A.weight, self.layer.lora_B.weight], lr=0.1)
        optimizer.register_step_pre_hook(self.before_inner_step)
        return optimizer


def dense_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, 5, 6, -100, 7, -100]])
    return {"x": torch.randn(2, 6, 8, generator=g), "t": torch.randn(2, 6, 5, generator=g), "labels": labels}


@pytest.mark.parametrize("pairing", ["kfac", "grit"])
@pytest.mark.parametrize("damping_mode", ["trace", "absolute"])
@pytest.mark.parametrize("preserve", [False, True])
def test_preconditioned_gradient_equals_dense_solve(pairing, damping_mode, preserve):
    batch = dense_batch()
    probe = DenseProbe()
    cb = KFACPreconditioner(update_freq=1, min_samples=1, damping=0.1, damping_mode=damping_mode,
                            pairing=pairing, preserve_grad_norm=preserve, clip_grad_norm=None)
    trainer(1, [cb]).fit(probe, DataLoader([batch], batch_size=None))
    rec = {k: v.double() for k, v in probe.record.items()}
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts token t+1
    u = (batch["x"].double() @ rec["A"].T)[mask]  # [n, r]
    v = (rec["g"] @ rec["B"])[mask]  # [n, r] = (B^T g)^T per token
    n = int(mask.sum())
    assert n == 4 + 3 and probe.layer.stats.n_a == n and probe.layer.stats.n_g == n
    S_a, S_g = u.T @ u / n, v.T @ v / n
    torch.testing.assert_close(probe.layer.stats.S_a.double(), S_a, rtol=0.0, atol=gram_atol(u, 8) / n)

    def damped(S):
        lam = 0.1 * torch.trace(S) / 3 if damping_mode == "trace" else torch.tensor(0.1, dtype=S.dtype)
        return S + lam * torch.eye(3, dtype=S.dtype)

    M_B, M_A = (damped(S_a), damped(S_g)) if pairing == "kfac" else (damped(S_g), damped(S_a))
    dB_ref = torch.linalg.solve(M_B, rec["dB"].T).T  # dB M^-1 (M symmetric)
    dA_ref = torch.linalg.solve(M_A, rec["dA"])  # M^-1 dA
    if preserve:
        dB_ref = dB_ref * rec["dB"].norm() / dB_ref.norm()
        dA_ref = dA_ref * rec["dA"].norm() / dA_ref.norm()
    # fp32 solve against a float64 one: relative error <= ~kappa eps (kappa: condition number of M);
    # the fp32 factors themselves differ from S by ~n eps relative. Allow 100 kappa eps of the largest entry.
    kappa = max(float(torch.linalg.cond(M_B)), float(torch.linalg.cond(M_A)))
    tol = 100 * kappa * 2.0**-24
    assert tol < 1e-3
    for got, ref, raw in ((rec["dB_pre"], dB_ref, rec["dB"]), (rec["dA_pre"], dA_ref, rec["dA"])):
        assert (ref - raw).abs().max() > 1e-2 * raw.abs().max()  # the preconditioner really changes it
        torch.testing.assert_close(got, ref, rtol=0.0, atol=tol * float(ref.abs().max()))
    assert trainer_metric(cb, probe) == {"layers": 1.0, "grads": 2.0}


def test_statistics_tokens_all_counts_every_position():
    """'loss' (default) counts the 7 positions that predict a label; 'all' every position (no padding here)."""
    counts = {}
    for tokens in ("loss", "all"):
        probe = DenseProbe()
        cb = KFACPreconditioner(update_freq=1, min_samples=1, statistics_tokens=tokens)
        trainer(1, [cb]).fit(probe, DataLoader([dense_batch()], batch_size=None))
        counts[tokens] = (probe.layer.stats.n_a, probe.layer.stats.n_g)
    assert counts == {"loss": (7, 7), "all": (12, 12)}  # [2, 6] positions


def trainer_metric(cb, module) -> dict[str, float]:
    m = module.trainer.callback_metrics
    return {"layers": float(m["grit/preconditioned_layers"]), "grads": float(m["grit/preconditioned_grads"])}


def test_damped_cholesky_trace_mode_is_scale_free_and_rejects_zero():
    S = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    batch = torch.stack([S, S * 1e-20, torch.zeros(2, 2)])  # [3, r, r]
    chol, inv_scale, cond, ok = damped_cholesky(batch, 0.01, "trace")
    assert ok.tolist() == [True, True, False]
    torch.testing.assert_close(chol[0], chol[1])
    assert float(inv_scale[1]) == pytest.approx(float(inv_scale[0]) * 1e20, rel=1e-5)
    assert float(cond[0]) == pytest.approx(float(cond[1]), rel=1e-5)
    M = S / 3.0 + 0.01 * torch.eye(2)  # tr/r = 3
    ev = torch.linalg.eigvalsh(M)
    assert float(cond[0]) == pytest.approx(float(ev[1] / ev[0]), rel=1e-5)
    torch.testing.assert_close(chol[0] @ chol[0].T, M)
    _, inv_abs, _, ok_abs = damped_cholesky(batch, 0.01, "absolute")
    assert ok_abs.tolist() == [True, True, False] and inv_abs.tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- hook placement in Lightning's step
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_grit_step_differs_from_lora_and_disabled_is_identical(optimizer):
    def run(callbacks):
        module = TinyGrit(optimizer)
        trainer(2, callbacks).fit(module, loader(2))
        return lora_params(module), module

    plain, _ = run([])
    off, _ = run([KFACPreconditioner(min_samples=1, update_freq=1, enabled=False, clip_grad_norm=None)])
    on, module = run([KFACPreconditioner(min_samples=1, update_freq=1)])
    assert plain.keys() == on.keys() and len(plain) == 12  # 6 layers x (A, B)
    for name in plain:
        assert torch.equal(plain[name], off[name]), name
    diff = max(float((plain[n] - on[n]).abs().max()) for n in plain)
    assert diff > 1e-4, f"K-FAC changed nothing (max |delta| = {diff})"
    assert trainer_metric(None, module) == {"layers": 6.0, "grads": 12.0}


def test_clip_grad_norm_clips_before_preconditioning():
    """GRIT's default clips in the hook, before preconditioning (the reference's order): with the
    preconditioner disabled the gradient the optimizer sees has exactly the clip norm; enabled, the
    preconditioned gradient is that of the clipped one (its norm is no longer the limit)."""

    class Spy(TinyGrit):
        def norm(self):
            return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.parameters() if p.grad is not None)))

        def on_after_backward(self):
            self.raw = self.norm()

        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            optimizer.register_step_pre_hook(lambda *_: setattr(self, "final", self.norm()))  # after GRIT's work
            return optimizer

    off = Spy("sgd")
    trainer(1, [KFACPreconditioner(min_samples=1, update_freq=1, clip_grad_norm=1e-3, enabled=False)]).fit(off, loader(1))
    assert off.raw > 1e-2  # the clip acts
    # torch's clip scales by c / (norm + 1e-6); fp32 squares summed over 12 tensors: ~1e-6 relative
    assert off.final == pytest.approx(1e-3 * off.raw / (off.raw + 1e-6), rel=1e-5)
    on = Spy("sgd")
    trainer(1, [KFACPreconditioner(min_samples=1, update_freq=1, clip_grad_norm=1e-3)]).fit(on, loader(1))
    assert abs(on.final - 1e-3) > 1e-5  # preconditioned after the clip
    with pytest.warns(UserWarning, match="clips them again"):
        trainer(1, [KFACPreconditioner(min_samples=1)], gradient_clip_val=1.0).fit(TinyGrit("sgd"), loader(1))


def test_clip_stage_after_clips_the_preconditioned_gradient():
    """``clip_stage="after"`` clips what preconditioning produced: the optimizer sees the clip norm
    exactly; Lightning's own clipping (``gradient_clip_val``) acts on the loss gradients, before GRIT."""

    class Spy(TinyGrit):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.unclipped = [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            self.clipped = [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]

        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            optimizer.register_step_pre_hook(
                lambda *_: setattr(self, "final", [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]))
            return optimizer

    def norm(grads):
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))

    module = Spy("sgd")
    cb = KFACPreconditioner(min_samples=1, update_freq=1, clip_grad_norm=1e-3, clip_stage="after")
    trainer(1, [cb]).fit(module, loader(1))
    assert norm(module.final) == pytest.approx(1e-3, rel=1e-5)
    module = Spy("sgd")
    cb = KFACPreconditioner(min_samples=1, update_freq=1, clip_grad_norm=None)
    trainer(1, [cb], gradient_clip_val=1e-3).fit(module, loader(1))
    assert norm(module.unclipped) > 1e-2 and norm(module.clipped) == pytest.approx(1e-3, rel=1e-5)
    assert abs(norm(module.final) - 1e-3) > 1e-4  # preconditioned after Lightning's clip


# --------------------------------------------------------------------------- resume
def test_resume_reproduces_continuous_run(tmp_path):
    def callbacks():
        return [
            KFACPreconditioner(min_samples=1, update_freq=3),
            NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1),
        ]

    full = TinyGrit("adamw")
    trainer(4, callbacks()).fit(full, loader(1))

    first = TinyGrit("adamw")
    t1 = trainer(2, callbacks())
    t1.fit(first, loader(1))
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = TinyGrit("adamw")
    trainer(4, callbacks()).fit(resumed, loader(1), ckpt_path=ckpt)
    a, b = lora_params(full), lora_params(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    class Forgetful(KFACPreconditioner):  # negative control: drop the K-FAC state on resume
        def load_state_dict(self, state_dict):
            pass

    control = TinyGrit("adamw")
    forgetful = [Forgetful(min_samples=1, update_freq=3), NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1)]
    trainer(4, forgetful).fit(control, loader(1), ckpt_path=ckpt)
    c = lora_params(control)
    assert max(float((a[n] - c[n]).abs().max()) for n in a) > 0


def test_state_dict_round_trip_keeps_factors_and_cache():
    module = TinyGrit("adamw")
    cb = KFACPreconditioner(min_samples=1, update_freq=5)
    trainer(2, [cb]).fit(module, loader(1))
    state = cb.state_dict()
    assert state["step"] == 2 and len(state["layers"]) == 6
    other = TinyGrit("adamw")
    cb2 = KFAC(min_samples=1, update_freq=5)
    cb2.load_state_dict(state)
    assert cb2.state_dict()["step"] == 2  # pending state survives a save before attach
    cb2.attach(other)
    restored = cb2.state_dict()["layers"]
    for name, layer in grit_layers(other).items():
        ref = grit_layers(module)[name].stats
        assert torch.equal(layer.stats.S_a, ref.S_a) and layer.stats.n_g == ref.n_g
        chol = state["layers"][name]["a"]["chol"]
        assert chol is not None and torch.equal(restored[name]["a"]["chol"], chol)
    bad = KFAC()
    bad.attach(TinyGrit().model.model.layers[0])  # fewer layers than saved
    with pytest.raises(ValueError, match="same target_modules"):
        bad.load_state_dict(state)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pairing": "fisher"}, "pairing"),
        ({"damping_mode": "relative"}, "damping_mode"),
        ({"update_freq": 0}, "update_freq"),
        ({"damping": 0.0}, "damping"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"min_samples": 0}, "min_samples"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"clip_grad_norm": "1"}, "clip_grad_norm"),
        ({"factor_average": "cumulative"}, "factor_average"),
        ({"statistics_tokens": "prompt"}, "statistics_tokens"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(**kwargs)
    with pytest.raises(ValueError, match=match):
        KFAC(**kwargs)


def test_model_without_grit_layers_is_rejected():
    with pytest.raises(ValueError, match="inject_grit_layers"):
        KFACPreconditioner().attach(nn.Sequential(nn.Linear(2, 2)))


def test_step_metrics_are_this_steps_for_callbacks_listed_before_kfac():
    """GRIT's metrics are logged inside the optimizer step: a callback listed *before* the K-FAC callback
    reads this step's values in its on_train_batch_end (the database logger does), not the previous step's.
    With the reference's timing the first step preconditions nothing and the later ones do."""
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics.get("grit/preconditioned_grads", -1)))

    kfac = KFACPreconditioner(min_samples=1, update_freq=1, inverse_timing="previous_step")
    trainer(3, [Spy(), kfac]).fit(TinyGrit("sgd"), loader(3))
    n = 2 * len(TARGETS) * 2  # A and B of every GRIT layer (2 blocks)
    assert seen == [0.0, float(n), float(n)]
