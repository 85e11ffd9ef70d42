"""Neural reprojection: subspace projection of A, B and the optimizer's first moment, rank choice,
gradient-accumulation safety, state and errors. Tests that need no Trainer use the plain-torch
:class:`fteval.grit.Reprojection` that the callback adds its hooks to."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.grit import GritLoraLinear, RankSpaceStats, Reprojection, grit_layers, inject_grit_layers

R = 6


class TinyGrit(L.LightningModule):
    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(cfg)
        inject_grit_layers(self.model, ["q_proj", "down_proj"], r=R, alpha=12, dropout=0.0)
        for layer in grit_layers(self.model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def lm_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels}


def fit(module, callbacks, steps, n_batches=1, **kw):
    trainer = L.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, **kw,
    )
    trainer.fit(module, DataLoader([lm_batch(i) for i in range(n_batches)], batch_size=None))
    return trainer


EPS32 = 2.0**-24  # fp32 unit round-off


def residual(P_basis: torch.Tensor, M: torch.Tensor, side: str) -> float:
    """Largest entry of the part of M outside span(P_basis) (rows: side 'left', columns: 'right'),
    relative to M's largest entry; computed in float64."""
    P_basis, M = P_basis.double(), M.double()
    P = P_basis @ P_basis.T
    out = M - P @ M if side == "left" else M - M @ P
    return float(out.abs().max() / M.abs().max())


# An fp32 projection P M (P = V V^T from an fp32 eigh, r x r) leaves a residual of a few r eps
# relative to M's scale (each entry is an r-term sum; V is orthonormal to ~r eps); allow 16 r eps.
RESIDUAL_TOL = 16 * R * EPS32


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_rows_of_A_and_first_moment_lie_in_top_k_subspace(optimizer):
    module = TinyGrit(optimizer)
    reproj = NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1, project_moments=True)
    trainer = fit(module, [KFACPreconditioner(min_samples=1, update_freq=1), reproj], steps=2)
    opt_state = trainer.optimizers[0].state
    moment = "exp_avg" if optimizer == "adamw" else "momentum_buffer"
    layers = grit_layers(module)
    assert len(layers) == 4 and float(trainer.callback_metrics["grit/reprojected_layers"]) == 4.0
    for name, layer in layers.items():
        st = layer.stats
        V_a = torch.linalg.eigh(st.S_a).eigenvectors[:, -2:]  # top-2 of the factors used (unchanged since)
        V_g = torch.linalg.eigh(st.S_g).eigenvectors[:, -2:]
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        assert residual(V_a, A, "left") < RESIDUAL_TOL and residual(V_g, B, "right") < RESIDUAL_TOL
        assert residual(V_a, opt_state[layer.lora_A.weight][moment], "left") < RESIDUAL_TOL
        assert residual(V_g, opt_state[layer.lora_B.weight][moment], "right") < RESIDUAL_TOL
        assert torch.linalg.matrix_rank(A).item() == 2 and torch.linalg.matrix_rank(B).item() == 2
    assert reproj.effective_ranks() == {name: 2 for name in layers}
    assert float(trainer.callback_metrics["grit/effective_rank_mean"]) == 2.0


def test_direct_reprojection_projects_exp_avg_and_keeps_exp_avg_sq():
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    layer.stats = RankSpaceStats(4, "cpu")
    Q = torch.linalg.qr(torch.randn(4, 4)).Q
    layer.stats.S_a = Q @ torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.1])) @ Q.T
    layer.stats.n_a = 1000  # S_g has no samples: B is projected with V_a
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(3, 10)).pow(2).sum().backward()
    opt.step()
    A0 = layer.lora_A.weight.detach().clone()
    sq = {p: opt.state[p]["exp_avg_sq"].clone() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    m_A0 = opt.state[layer.lora_A.weight]["exp_avg"].clone()
    cb = Reprojection(top_k=2, min_samples=10, project_moments=True)
    assert cb.reproject(layer, [opt]) == 1
    V = Q[:, :2].double()  # eigenvectors of the two largest eigenvalues (gap 4 - 1 = 3 of 9: well separated)
    tol = 16 * 4 * EPS32  # fp32 projection of an r = 4 factor, relative to the largest entry (see RESIDUAL_TOL)
    for got, ref in ((layer.lora_A.weight.detach(), V @ V.T @ A0.double()),
                     (opt.state[layer.lora_A.weight]["exp_avg"], V @ V.T @ m_A0.double())):
        torch.testing.assert_close(got.double(), ref, rtol=0.0, atol=tol * float(ref.abs().max()))
    assert residual(V, layer.lora_B.weight.detach(), "right") < tol  # fallback basis V_a
    for p, ref in sq.items():
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref)
    assert torch.equal(cb.state_dict()["bases"][""]["V_g"], cb.state_dict()["bases"][""]["V_a"])


def test_first_moment_is_left_alone_by_default():
    """The reference projects A and B only; the first-moment projection is the named option project_moments."""
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    layer.stats = RankSpaceStats(4, "cpu")
    layer.stats.S_a = torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.1]))
    layer.stats.n_a = 1000
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(3, 10)).pow(2).sum().backward()
    opt.step()
    m0 = {p: opt.state[p]["exp_avg"].clone() for p in (layer.lora_A.weight, layer.lora_B.weight)}
    cb = Reprojection(top_k=2, min_samples=10)
    assert not cb.project_moments and cb.reproject(layer, [opt]) == 1
    for p, ref in m0.items():
        assert torch.equal(opt.state[p]["exp_avg"], ref)
    A = layer.lora_A.weight.detach()  # A itself was projected: rows 3 and 4 (the small eigenvalues of a diagonal S_a) vanish
    assert float(A[2:].abs().max()) <= RESIDUAL_TOL * float(A.abs().max()) < float(A[:2].abs().max())


def test_dynamic_rank_defaults_are_the_references():
    cb = NeuralReprojection(dynamic_rank=True)
    assert (cb.energy_threshold, cb.min_rank) == (0.99, 4)
    layer = GritLoraLinear(nn.Linear(10, 7), r=3, alpha=3.0)  # r below the floor 4: k is clamped to r
    layer.stats = RankSpaceStats(3, "cpu")
    layer.stats.S_a = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    layer.stats.n_a = 1000
    cb = Reprojection(dynamic_rank=True, min_samples=1)
    cb.reproject(layer)
    assert cb.effective_ranks() == {"": 3}


def test_dynamic_rank_from_energy():
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(10, 7), r=5, alpha=5.0)
    layer.stats = RankSpaceStats(5, "cpu")
    layer.stats.S_a = torch.diag(torch.tensor([0.5, 6.0, 3.0, 0.3, 0.2]))  # trace 10: top-2 hold 0.9
    layer.stats.n_a = 100
    for threshold, min_rank, expected in ((0.9, 1, 2), (0.91, 1, 3), (0.5, 1, 1), (0.5, 3, 3), (1.0, 1, 5)):
        cb = Reprojection(dynamic_rank=True, energy_threshold=threshold, min_rank=min_rank, min_samples=1)
        cb.reproject(layer)
        assert cb.effective_ranks() == {"": expected}, (threshold, min_rank)


def test_acts_once_per_period_under_gradient_accumulation():
    class Counting(NeuralReprojection):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.calls: list[int] = []

        def reproject(self, model, optimizers=()):
            self.calls.append(self.kfac.step)  # optimizer steps done when it acts
            return super().reproject(model, optimizers)

    cb = Counting(every_n_steps=2, top_k=3, min_samples=1)
    cb.kfac = KFACPreconditioner(min_samples=1)
    module = TinyGrit()
    # 8 micro-batches, 2 per optimizer step -> 4 optimizer steps -> reprojection at steps 2 and 4 only
    fit(module, [cb.kfac, cb], steps=4, n_batches=8, accumulate_grad_batches=2)
    assert cb.calls == [2, 4]
    assert cb.state_dict()["period"] == 2


def test_not_ready_layers_are_left_alone():
    layer = GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0)
    layer.stats = RankSpaceStats(4, "cpu")
    layer.stats.S_a = torch.eye(4)
    layer.stats.n_a = 5
    A0 = layer.lora_A.weight.detach().clone()
    cb = Reprojection(top_k=2, min_samples=6)
    assert cb.reproject(layer) == 0
    assert torch.equal(layer.lora_A.weight, A0) and cb.effective_ranks() == {"": 4}


def test_state_dict_round_trip():
    """The kept subspaces live on the layers; a state loaded before attaching is restored onto them."""
    cb = Reprojection(top_k=2, min_samples=1)
    layer = GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0)
    layer.stats = RankSpaceStats(4, "cpu")
    layer.stats.S_a = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    layer.stats.n_a = 10
    cb.reproject(layer)
    cb.period = 3
    assert layer.subspace.rank == 2 and layer.subspace.basis["V_a"].shape == (4, 2)
    other = Reprojection()
    other.load_state_dict(cb.state_dict())
    assert other.period == 3 and other.state_dict()["ranks"] == {"": 2}  # held until attached
    fresh = GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0)
    other.attach(fresh)
    assert other.effective_ranks() == {"": 2} and fresh.subspace.rank == 2
    assert torch.equal(other.state_dict()["bases"][""]["V_a"], cb.state_dict()["bases"][""]["V_a"])
    assert Reprojection().attach(GritLoraLinear(nn.Linear(10, 7), r=4, alpha=4.0))[""].subspace.rank == 4


def test_requires_kfac_statistics():
    with pytest.raises(ValueError, match="KFACPreconditioner"):
        fit(TinyGrit(), [NeuralReprojection()], steps=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"top_k": 0}, "top_k"),
        ({"energy_threshold": 0.0}, "energy_threshold"),
        ({"energy_threshold": 1.5}, "energy_threshold"),
        ({"min_rank": 0}, "min_rank"),
        ({"min_samples": -1}, "min_samples"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralReprojection(**kwargs)
    with pytest.raises(ValueError, match=match):
        Reprojection(**kwargs)
