"""K-FAC preconditioner: exact maths against a dense solve, hook placement through a real Trainer,
token masking, gradient checkpointing, resume, DDP all-reduce. Tests that need no Trainer use the
plain-torch :class:`fteval.grit.KFAC` that the callback adds its hooks to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.grit import KFAC, GritLoraLinear, damped_cholesky, grit_layers, inject_grit_layers, token_mask_from_batch

REPO = Path(__file__).resolve().parents[2]
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

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
        self.record["dA_pre"] = self.layer.lora_A.weight.grad.detach().clone()
        self.record["dB_pre"] = self.layer.lora_B.weight.grad.detach().clone()
        self.record["A"] = self.layer.lora_A.weight.detach().clone()
        self.record["B"] = self.layer.lora_B.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD([self.layer.lora_A.weight, self.layer.lora_B.weight], lr=0.1)


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


# --------------------------------------------------------------------------- ordering through Lightning
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

        def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hooks
            self.final = self.norm()

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


def test_gradient_clipping_sees_preconditioned_gradient():
    """Lightning's clipping runs after the hook: with preserve_grad_norm=False the clipped norm is the limit."""

    class Spy(TinyGrit):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.seen = [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

        def on_before_optimizer_step(self, optimizer):
            self.before = [p.grad.detach().clone() for p in self.parameters() if p.grad is not None]

    module = Spy("sgd")
    cb = KFACPreconditioner(min_samples=1, update_freq=1, preserve_grad_norm=False, clip_grad_norm=None)
    trainer(1, [cb], gradient_clip_val=1e-3).fit(module, loader(1))
    assert all(torch.equal(a, b) for a, b in zip(module.seen, module.before))
    final = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in module.parameters() if p.grad is not None))
    assert float(final) == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------------- statistics
def _stats_after_one_pass(model: nn.Module, batch: dict[str, torch.Tensor]) -> KFAC:
    cb = KFAC(min_samples=1)
    cb.attach(model)
    model.train()
    cb.begin_micro_batch(token_mask_from_batch(batch))
    model(**batch).loss.backward()
    cb.flush()  # the layers' tensors wait for one batched matmul per step
    return cb


def test_masked_tokens_do_not_enter_statistics():
    torch.manual_seed(0)
    model = tiny_llama()
    layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    seen: dict[str, torch.Tensor] = {}  # u = A x per layer, from the layer's input (dropout is 0)
    for name, layer in layers.items():
        layer.register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (i[0] @ m.lora_A.weight.T).detach())
        )
    batch = lm_batch()
    _stats_after_one_pass(model, batch)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    n = int(mask.sum())
    assert n == 7 + 4  # row 0: positions 4..10; row 1 (padded from 9): positions 4..7
    for name, layer in layers.items():
        st = layer.stats
        assert int(st.cnt_a) == n and int(st.cnt_g) == n
        u = seen[name][mask]  # [n, r]
        ref = u.double().T @ u.double()
        torch.testing.assert_close(st.sum_a.double(), ref, rtol=0.0, atol=gram_atol(u, 64))
        u_all = seen[name].reshape(-1, 4)
        assert not torch.allclose(st.sum_a, u_all.T @ u_all, rtol=1e-3)  # the mask mattered


def test_token_mask_alignment_and_fallbacks():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 3, -100, -100]])
    mask = token_mask_from_batch({"labels": labels, "attention_mask": torch.ones(2, 4)})
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    att = torch.tensor([[1, 1, 0, 0]])
    assert token_mask_from_batch({"attention_mask": att}).tolist() == [[True, True, False, False]]
    both = {"labels": labels, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert token_mask_from_batch(both, "all").tolist() == [[True, True, True, True], [True, True, True, False]]
    assert token_mask_from_batch({"labels": labels}, "all") is None  # no padding information: every position
    with pytest.raises(ValueError, match="statistics_tokens"):
        token_mask_from_batch(both, "response")
    assert token_mask_from_batch((torch.zeros(1),)) is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(reentrant):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_llama()
        layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
        for layer in layers.values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        calls = [0]
        first = next(iter(layers.values()))
        first.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        _stats_after_one_pass(model, lm_batch())
        stats = {
            n: (int(l.stats.cnt_a), int(l.stats.cnt_g), l.stats.sum_a.clone(), l.stats.sum_g.clone())
            for n, l in layers.items()
        }
        results.append((calls[0], stats))
    (calls_plain, plain), (calls_ckpt, ckpt) = results
    assert calls_plain == 1 and calls_ckpt == 2  # checkpointing really re-ran the forward
    for name in plain:
        assert plain[name][0] == ckpt[name][0] == 11 and plain[name][1] == ckpt[name][1] == 11
        torch.testing.assert_close(plain[name][2], ckpt[name][2])
        torch.testing.assert_close(plain[name][3], ckpt[name][3])


def test_no_statistics_in_eval_or_no_grad():
    torch.manual_seed(0)
    model = tiny_llama()
    layers = inject_grit_layers(model, ["q_proj"], r=4, alpha=8, dropout=0.0)
    cb = KFAC(min_samples=1)
    cb.attach(model)
    model.eval()
    cb.begin_micro_batch(None)
    model(**lm_batch())
    model.train()
    with torch.no_grad():
        model(**lm_batch())
    cb.flush()
    assert all(int(l.stats.cnt_a) == 0 for l in layers.values())
    cb.detach()
    model(**lm_batch()).loss.backward()  # no longer recorded
    cb.flush()
    assert all(int(l.stats.cnt_a) == 0 for l in layers.values())


@pytest.mark.parametrize("factor_average", ["ema", "mean"])
def test_ema_after_first_refresh_and_update_freq(factor_average):
    """Running mean until a side is first used, EMA after ('mean': a cumulative mean throughout, the
    reference's); inverses only refreshed every update_freq steps."""
    g = torch.Generator().manual_seed(0)
    layer = GritLoraLinear(nn.Linear(6, 4), r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(4, 2, generator=g))
    cb = KFAC(min_samples=1, update_freq=3, ema_decay=0.5, factor_average=factor_average)
    cb.attach(layer)
    xs = [torch.randn(5, 6, generator=g) for _ in range(4)]
    expected, seen = None, []
    for step, x in enumerate(xs):
        cb.begin_micro_batch(None)
        layer(x).pow(2).sum().backward()
        u = (x.double() @ layer.lora_A.weight.double().T).detach()
        mean = u.T @ u / 5
        seen.append(mean)
        if factor_average == "mean":
            expected = sum(seen) / len(seen)
        else:
            expected = mean if expected is None else 0.5 * expected + 0.5 * mean
        cb.optimizer_step_work(None)
        # fp32 Gram sums of 5 tokens and <= 4 folds: round-off <= ~16 eps of the factor's largest entry
        atol = 16 * 2.0**-24 * float(expected.abs().max())
        torch.testing.assert_close(layer.stats.S_a.double(), expected, rtol=0.0, atol=atol)
        assert cb.state_dict()["layers"][""]["a"]["refreshed_at"] == (0 if step < 3 else 3)
        layer.lora_A.weight.grad = layer.lora_B.weight.grad = None


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


# --------------------------------------------------------------------------- DDP
DDP_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    sys.path.insert(0, os.environ["REPO"])
    from fteval.grit import KFAC, GritLoraLinear, Reprojection
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(6, 4), r=3, alpha=3.0)
    nn.init.normal_(layer.lora_B.weight)
    cb = KFAC(min_samples=1, update_freq=1)
    cb.attach(layer)
    xs = [torch.randn(7, 6, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    cb.begin_micro_batch(None)
    layer(xs[rank]).pow(2).sum().backward()
    cb.optimizer_step_work(None)
    u = torch.cat(xs) @ layer.lora_A.weight.detach().T
    ref = u.double().T @ u.double() / 14  # float64; fp32 sums of 14 tokens (2 ranks) of 6-term products:
    atol = 4 * (14 + 12) * 2.0**-24 * float((u.double().abs().T @ u.double().abs()).max()) / 14  # see gram_atol
    ok = torch.allclose(layer.stats.S_a.double(), ref, rtol=0.0, atol=atol) and layer.stats.n_a == 14
    gathered = [torch.zeros(3, 3) for _ in range(2)]
    dist.all_gather(gathered, layer.stats.S_g)
    ok = ok and torch.equal(gathered[0], gathered[1])
    ok = ok and Reprojection(top_k=2, min_samples=1).reproject(layer) == 1  # broadcasts the projections
    A = [torch.zeros(3, 6) for _ in range(2)]
    dist.all_gather(A, layer.lora_A.weight.detach().contiguous())
    ok = ok and torch.equal(A[0], A[1]) and torch.linalg.matrix_rank(A[0]).item() == 2
    print(f"rank{rank} ok={ok}")
    dist.destroy_process_group()
    """
)


def test_ddp_factors_are_all_reduced(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, REPO=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank0 ok=True" in proc.stdout and "rank1 ok=True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_amp_loss_scale_and_lora_scaling_are_divided_out():
    """S_g is in units of (dL/dy)^2: independent of the grad scaler's loss scale and of alpha."""

    def s_g(alpha: float, loss_scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        layer = GritLoraLinear(nn.Linear(6, 4), r=2, alpha=alpha)
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.arange(8.0).reshape(4, 2) / 8)
        cb = KFAC(min_samples=1)
        cb.attach(layer)
        cb.begin_micro_batch(None, grad_scale=loss_scale)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        (loss_scale * layer(x).sin().sum()).backward()
        cb.flush()
        return layer.stats.sum_g.clone()

    ref = s_g(2.0, 1.0)
    assert float(ref.abs().max()) > 1e-3
    # the loss scale is a power of two: multiplying and dividing it out is exact in fp32
    torch.testing.assert_close(s_g(2.0, 1024.0), ref, rtol=0.0, atol=0.0)
    # a different alpha changes y itself, so compare against the explicit formula instead
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(6, 4), r=2, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.arange(8.0).reshape(4, 2) / 8)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    g = torch.autograd.grad(y.sin().sum(), y)[0]  # dL/dy [5, 4]
    v = g @ layer.lora_B.weight.detach()  # [5, r]
    torch.testing.assert_close(s_g(16.0, 1.0).double(), v.double().T @ v.double(), rtol=0.0, atol=gram_atol(v, 4))


def test_non_finite_statistics_are_dropped_with_a_warning():
    """The batched device-side fold drops a side whose sums overflowed, keeps the rest, and says so once."""
    torch.manual_seed(0)
    layers = [GritLoraLinear(nn.Linear(6, 6), r=2, alpha=2.0) for _ in range(2)]
    model = nn.Sequential(*layers)
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight)
    cb = KFAC(min_samples=1, update_freq=100)
    cb.attach(model)
    cb.begin_micro_batch(None)
    model(torch.randn(5, 6)).pow(2).sum().backward()
    cb.optimizer_step_work(None)
    before = [(l.stats.S_a.clone(), l.stats.S_g.clone(), l.stats.n_a, l.stats.n_g) for l in layers]
    assert before[0][2] == 5 and before[1][3] == 5
    cb.begin_micro_batch(None)
    model(torch.randn(5, 6)).pow(2).sum().backward()
    cb.flush()
    layers[0].stats.pending[0, 0, 0] = float("inf")  # layer 0's S_a sum overflowed this step
    with pytest.warns(UserWarning, match="non-finite statistics"):
        cb.optimizer_step_work(None)
    s0, s1 = layers[0].stats, layers[1].stats
    assert torch.equal(s0.S_a, before[0][0]) and s0.n_a == 5  # dropped: unchanged, tokens not counted
    assert not torch.equal(s0.S_g, before[0][1]) and s0.n_g == 10  # the finite side folded
    assert not torch.equal(s1.S_a, before[1][0]) and s1.n_a == 10
    assert torch.isfinite(torch.stack([s0.S_a, s0.S_g, s1.S_a, s1.S_g])).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.begin_micro_batch(None)
        model(torch.randn(5, 6)).pow(2).sum().backward()
        cb.optimizer_step_work(None)  # the flag was taken: no repeat warning
