"""The training engine the module composes: its options, its observer interface, and graphed
micro-batches that survive Lightning's zero_grad whatever the optimizer's zeroing mode."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fteval.models.engine import MicroBatchObserver, TrainingEngine, training_engine
from fteval.models.qlora import QLoRAModule
from tests.models.test_cuda_graph import _batches, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kwargs,match", [
    ({"fused_loss": "fast"}, "fused_loss='fast' must be 'off', 'chunked' or 'liger'"),
    ({"loss_chunk_tokens": 0}, "loss_chunk_tokens=0 must be >= 1"),
])
def test_bad_engine_options_are_refused_by_the_module(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QLoRAModule(quantization="none", **kwargs)


def test_module_builds_its_engine_from_its_options():
    module = QLoRAModule(quantization="none", fused_loss="chunked", loss_chunk_tokens=7, cuda_graph=True)
    engine = training_engine(module)
    assert engine is module.engine
    assert (engine.fused_loss, engine.loss_chunk_tokens, engine.cuda_graph, engine.runs_backward_in_step) == (
        "chunked", 7, True, True)
    assert module.configure_callbacks() == [engine]  # its fit hooks run only when it runs backward itself
    assert engine.attention("auto") == "sdpa" and engine.attention("eager") == "eager"
    plain = QLoRAModule(quantization="none")
    assert plain.configure_callbacks() == [] and not plain.engine.runs_backward_in_step
    assert plain.engine.attention("auto") == "auto"
    assert training_engine(torch.nn.Linear(2, 2)) is None


def test_observers_must_declare_the_interface():
    engine = TrainingEngine(cuda_graph=True)

    class Duck:  # has the methods, but does not say it is an observer
        def before_micro_batch(self, batch): ...
        def after_micro_batch(self): ...

    with pytest.raises(TypeError, match="Duck is not a MicroBatchObserver"):
        engine.add_micro_batch_observer(Duck())


def test_engine_runs_observers_around_each_micro_batch_and_matches_eager_gradients():
    model = tiny()
    for n, p in model.named_parameters():
        p.requires_grad_("q_proj" in n)
    params = [p for p in model.parameters() if p.requires_grad]
    seen: list[str] = []

    class Recorder(MicroBatchObserver):
        def before_micro_batch(self, batch):
            seen.append(f"before {tuple(batch['input_ids'].shape)}")

        def after_micro_batch(self):
            seen.append("after")

    engine = TrainingEngine(cuda_graph=True, capture=False)
    engine.add_micro_batch_observer(Recorder())
    engine.start(model, params, accumulate_grad_batches=2)
    batch = _batches(1)[0]
    loss = engine.training_loss(model, batch, batch_idx=0)
    graphed = [p.grad.clone() for p in params]
    assert loss.requires_grad and loss.grad_fn is None  # a leaf: a caller's backward reaches no parameter
    loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, graphed))
    assert seen == ["before (2, 12)", "after"]
    counts = engine.stop()
    assert counts == {"eager": 1} and engine.graphs is None

    model.zero_grad(set_to_none=True)
    eager = engine.loss(model, batch)
    (eager / 2).backward()
    torch.testing.assert_close(loss.detach(), eager.detach(), rtol=0, atol=0)
    for g, p in zip(graphed, params):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


class InPlaceZeroSGD(torch.optim.SGD):
    """An optimizer whose zero_grad zeroes in place (set_to_none ignored)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=False)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, InPlaceZeroSGD])
def test_graphed_fit_survives_lightnings_zero_grad(optimizer):
    """Lightning zeroes after training_step, which under cuda_graph already ran backward: in either zeroing
    mode the graphed fit must train exactly as the eager one."""
    def fit(cuda_graph: bool) -> dict[str, torch.Tensor]:
        module = QLoRAModule(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"),
                             optimizer=lambda p: optimizer(p, lr=0.5), lr_schedule="constant",
                             cuda_graph=cuda_graph)
        module.setup_base_model(tiny())
        module.engine.capture = False
        module.on_train_end = lambda: None
        trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            limit_val_batches=0)
        trainer.fit(module, DataLoader(_batches(6), batch_size=None))
        if cuda_graph:
            assert module.engine.counts == {"eager": 2, "captured": 1, "replayed": 3}
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    eager, graphed = fit(False), fit(True)
    moved = [float(p.abs().max()) for n, p in eager.items() if "lora_B" in n]
    assert moved and min(moved) > 1e-4  # the adapters trained
    for name, p in eager.items():
        torch.testing.assert_close(graphed[name], p, rtol=0, atol=2e-6, msg=name)
