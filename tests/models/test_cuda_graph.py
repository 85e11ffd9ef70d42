"""cuda_graph: training micro-batches through MicroBatchGraphs give the numbers of the eager path.

The capture itself needs CUDA; on the CPU these tests run the same path with ``capture=False``
(the static buffers, the in-place gradients, forward and backward inside training_step, the K-FAC
hook), which is everything but the graph. BENCHMARKS.md has the GPU measurements.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.data.formatting import pad_batch
from fteval.models.cuda_graph import MicroBatchGraphs, graphable_batch
from fteval.models.grit import GRITModule
from fteval.models.qlora import QLoRAModule

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def padded(lengths: list[int], seed: int = 0, side: str = "right", multiple_of: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    return pad_batch([{"input_ids": r, "labels": r} for r in rows], 0, side, multiple_of)


# ------------------------------------------------------------------ the batch a graph takes
def test_unpadded_batch_gets_a_broadcast_causal_mask_and_the_same_loss():
    model = tiny()
    batch = padded([12, 12])
    g = graphable_batch(batch)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert g["attention_mask"].shape == (2, 1, 12, 12) and torch.equal(g["attention_mask"][1, 0], causal)
    bare = graphable_batch({k: v for k, v in batch.items() if k != "attention_mask"})  # no mask: a broadcast view
    assert bare["attention_mask"].stride(0) == 0 and torch.equal(bare["attention_mask"][0, 0], causal)
    assert torch.equal(g["input_ids"], batch["input_ids"]) and torch.equal(g["labels"], batch["labels"])
    torch.testing.assert_close(model(**g).loss, model(**batch).loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_transformers_loss(side):
    model = tiny()
    batch = padded([5, 12, 9], seed=1, side=side)
    g = graphable_batch(batch)
    assert g["attention_mask"].shape == (3, 1, 12, 12)
    expected = model(**batch).loss
    got = model(**g).loss
    assert torch.isfinite(got)
    if side == "right":  # training batches (left padding makes the last padding row predict the first token)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # a padding key is never attended by another position
    m = g["attention_mask"][0, 0]
    pad = batch["attention_mask"][0] == 0
    assert not (m[:, pad] & ~torch.eye(12, dtype=torch.bool)[:, pad]).any()


def test_batches_a_graph_cannot_take_run_eagerly():
    batch = padded([6, 6])
    assert graphable_batch({**batch, "position_ids": batch["input_ids"]}) is None  # padding-free rows
    assert graphable_batch({**batch, "source_row": torch.tensor([1, 2])}) is None  # an unknown key
    assert graphable_batch({"labels": batch["labels"]}) is None
    assert graphable_batch([batch["input_ids"]]) is None


def test_pad_to_multiple_of_rounds_the_width_up():
    assert padded([5, 9], multiple_of=8)["input_ids"].shape == (2, 16)
    assert padded([5, 16], multiple_of=8)["input_ids"].shape == (2, 16)
    assert padded([5, 9])["input_ids"].shape == (2, 9)


# ------------------------------------------------------------------ MicroBatchGraphs
def _trainable(model):
    """The model, its trainable parameters and a forward + backward function returning the loss."""
    def forward_backward(batch):
        loss = model(**batch).loss
        loss.backward()
        return loss

    return model, [p for p in model.parameters() if p.requires_grad], forward_backward


def test_micro_batch_graphs_warm_up_capture_replay_with_the_eager_gradients():
    model, params, step = _trainable(tiny())
    graphs = MicroBatchGraphs(step, params, warmup=2, capture=False)
    batches = [graphable_batch(padded([10, 10], seed=s)) for s in range(5)]
    for b in batches:
        graphs.zero_grads()
        loss = graphs.run(b)
        got = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        expected = model(**b).loss
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)
        for g, p in zip(got, params):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    assert dict(graphs.counts) == {"eager": 2, "captured": 1, "replayed": 2}
    assert graphs.grads is not None and all(p.grad is not g for p, g in zip(params, graphs.grads))  # eager replaced them
    graphs.zero_grads()  # and the graphs' tensors are bound again, zeroed
    assert all(p.grad is g and not g.any() for p, g in zip(params, graphs.grads))


def test_micro_batch_graphs_keep_the_gradient_storage_and_limit_shapes():
    model = tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = MicroBatchGraphs(lambda b: model(**b).loss, params, warmup=1, max_graphs=1, capture=False)
    graphs.zero_grads()
    storage = [g.data_ptr() for g in graphs.grads]
    for p in params:
        p.grad = None  # e.g. an optimizer.zero_grad() that sets them to None
    graphs.run(graphable_batch(padded([8, 8])))
    assert [p.grad.data_ptr() for p in params] == storage
    for n in (8, 12, 16):  # only one shape is captured; the others stay eager
        graphs.run(graphable_batch(padded([n, n])))
        graphs.run(graphable_batch(padded([n, n])))
    assert len(graphs.graphs) == 1 and graphs.counts["captured"] == 1


@pytest.mark.parametrize("warmup,max_graphs", [(0, 8), (2, 0)])
def test_micro_batch_graphs_bad_settings(warmup, max_graphs):
    with pytest.raises(ValueError, match="cuda_graph"):
        MicroBatchGraphs(lambda b: b, [], warmup=warmup, max_graphs=max_graphs)


# ------------------------------------------------------------------ the modules in a Trainer
def _batches(n: int, width: int = 12) -> list[dict]:
    return [padded([width - 3, width], seed=i) for i in range(n)]


def _fit(method: str, cuda_graph: bool, steps: int = 4, accumulate: int = 2, checkpointing: bool = True) -> dict:
    cls = QLoRAModule if method == "qlora" else GRITModule
    module = cls(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"),
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), lr_schedule="constant",
                 gradient_checkpointing=checkpointing, cuda_graph=cuda_graph)
    module.setup_base_model(tiny())
    module.engine.capture = False  # the path without the capture: CPU
    callbacks = []
    if method == "grit":
        callbacks = [KFACPreconditioner(min_samples=1, update_freq=2),
                     NeuralReprojection(every_n_steps=2, top_k=2, min_samples=1)]
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0)
    module.hparams.export_dir = None
    module.on_train_end = lambda: None  # no adapter export in this test
    trainer.fit(module, DataLoader(_batches(steps * accumulate), batch_size=None))
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {"params": params, "loss": float(trainer.callback_metrics["train/loss"]),
            "counts": dict(module.engine.counts)}


@pytest.mark.parametrize("method", ["qlora", "grit"])
def test_module_trains_as_eager_with_accumulation(method):
    eager = _fit(method, cuda_graph=False)
    graphed = _fit(method, cuda_graph=True)
    assert graphed["params"].keys() == eager["params"].keys()
    for name, p in eager["params"].items():
        torch.testing.assert_close(graphed["params"][name], p, rtol=0, atol=2e-6, msg=name)
    assert graphed["loss"] == pytest.approx(eager["loss"], abs=1e-6)
    lora_b = [p for n, p in eager["params"].items() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) > 1e-4 for p in lora_b)  # trained away from their zero start


def test_module_runs_batches_of_one_shape_from_the_captured_graph(capsys):
    module = QLoRAModule(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj",),
                         lr_schedule="constant", cuda_graph=True)
    module.setup_base_model(tiny())
    module.engine.capture = False
    module.on_train_end = lambda: None
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(_batches(6), batch_size=None))
    assert module.engine.counts == {"eager": 2, "captured": 1, "replayed": 3}
    assert module.engine.graphs is None  # the graphs (and their memory) are released at the end of fit
    assert "[fteval] cuda_graph: 3 micro-batches replayed, 1 batch shapes captured, 2 run eagerly" in capsys.readouterr().out


def _fit_one_step(module):
    torch.manual_seed(1)  # the same dropout masks in every fit
    module.on_train_end = lambda: None  # no adapter export in this test
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(_batches(1), batch_size=None))
    return trainer


@pytest.mark.parametrize("attn,capture,reason", [
    ("sdpa", True, "this fit runs on cpu, and graphs need a CUDA device"),
    ("eager", False, "the model uses attention 'eager', and graphs need sdpa"),
])
def test_cuda_graph_falls_back_to_eager_with_one_notice(attn, capture, reason, capsys):
    module = QLoRAModule(quantization="none", r=4, target_modules=("q_proj",), cuda_graph=True)
    module.setup_base_model(tiny(attn), attn_implementation=attn)
    module.engine.capture = capture
    reference = QLoRAModule(quantization="none", r=4, target_modules=("q_proj",), cuda_graph=False)
    reference.setup_base_model(tiny(attn), attn_implementation=attn)
    _fit_one_step(module)
    err = capsys.readouterr().err
    assert err.count("[fteval] cuda_graph: off for this fit") == 1
    assert f"({reason}); micro-batches run eagerly" in err
    assert not module.engine.cuda_graph and module.engine.graphs is None and not module.engine.counts
    _fit_one_step(reference)  # the same step as a fit without the option
    params, expected = module.trainable_parameters(), reference.trainable_parameters()
    assert len(params) == len(expected) == 4
    for a, b in zip(params, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_several_processes_fall_back_too():
    engine = QLoRAModule(quantization="none", r=4, target_modules=("q_proj",), cuda_graph=True).engine
    assert engine.graph_fallback_reason("cuda", 2, "sdpa") == "this fit runs in 2 processes, and graphs run in one"
    assert engine.graph_fallback_reason("cuda", 1, "auto") is None
    assert engine.graph_fallback_reason("cuda", 1, "flash_attention_2").startswith("the model uses attention")


def test_cuda_graph_with_activation_offload_is_refused():
    module = QLoRAModule(quantization="none", r=4, target_modules=("q_proj",), cuda_graph=True, activation_offload=True)
    module.setup_base_model(tiny("sdpa"), attn_implementation="sdpa")
    module.engine.capture = False
    with pytest.raises(ValueError, match="activation_offload"):
        _fit_one_step(module)


def test_grit_statistics_are_added_inside_each_micro_batch(monkeypatch):
    """Under cuda_graph the K-FAC statistics must be added in the micro-batch (a replay runs no Python after it)."""
    calls = []
    original = KFACPreconditioner.flush
    monkeypatch.setattr(KFACPreconditioner, "flush", lambda self: (calls.append(self.capture._deferred != {}),
                                                                   original(self))[1])
    _fit("grit", cuda_graph=True, steps=2, accumulate=2)
    # per micro-batch (4, each with recorded tensors) and again before each optimizer step (2, nothing left)
    assert calls == [True, True, False, True, True, False]
    calls.clear()
    _fit("grit", cuda_graph=False, steps=2, accumulate=2)
    assert calls == [True, True]


def test_step_zeroes_then_runs_and_sends_ungraphable_batches_eagerly():
    model, params, fb = _trainable(tiny())
    graphs = MicroBatchGraphs(fb, params, warmup=1, capture=False)
    batch = padded([8, 8])
    graphs.step(batch)
    first = [g.clone() for g in graphs.grads]
    graphs.step(batch, zero_grads=False)  # accumulation: the second micro-batch adds to the first
    for g, f in zip(graphs.grads, first):
        torch.testing.assert_close(g, 2 * f, rtol=1e-5, atol=1e-7)
    graphs.step(batch)  # a new window: zeroed, then one micro-batch again
    for g, f in zip(graphs.grads, first):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-7)
    packed = {"input_ids": batch["input_ids"][:1], "labels": batch["labels"][:1],
              "position_ids": torch.arange(8)[None]}
    graphs.step(packed)
    assert graphs.counts == {"eager": 1, "captured": 1, "replayed": 1, "eager_unsupported": 1}
