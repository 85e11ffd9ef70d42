"""K-FAC statistics without a Trainer (the plain-torch :class:`fteval.grit.KFAC`): token masking,
gradient checkpointing, eval and no-grad passes, running mean then EMA, AMP loss scale and LoRA
scaling, non-finite sums, DDP all-reduce."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from fteval.grit import KFAC, GritLoraLinear, inject_grit_layers, token_mask_from_batch
from tests.callbacks.test_kfac import REPO, TARGETS, gram_atol, lm_batch, tiny_llama


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
    # --standalone: a free port for the rendezvous; gloo over the loopback interface only
    env = dict(os.environ, REPO=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
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
