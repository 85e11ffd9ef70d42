"""QLoRAModule on the embedded model: learning, 4-bit gradient flow, export, resume, bad input."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fteval.data import AlignmentDataModule
from fteval.models import QLoRAModule
from tests.conftest import accd_rows, alignment_rows, write_jsonl


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def datamodule(tmp_path, n_train=20, **kw):
    files = {"train": write_jsonl(tmp_path / "t.jsonl", alignment_rows(n_train)),
             "eval": write_jsonl(tmp_path / "e.jsonl", accd_rows(6, 6))}
    args = dict(train_source=str(files["train"]), eval_source=str(files["eval"]), output_dir=str(tmp_path / "d"),
                max_length=64, batch_size=2, n_per_class=4, val_fraction=0.2)
    args.update(kw)
    return AlignmentDataModule(**args)


def trainer(tmp_path, max_steps, **kw):
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                enable_checkpointing=False, limit_val_batches=2, val_check_interval=1.0)
    args.update(kw)
    return L.Trainer(**args)


def test_loss_falls_when_overfitting_a_tiny_set(tmp_path):
    L.seed_everything(0)
    dm = datamodule(tmp_path, n_train=10, val_fraction=0.2)
    model = QLoRAModule(quantization="nf4", r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"),
                        optimizer=adamw(3e-3), lr_schedule="constant", export_dir=str(tmp_path / "adapter"))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, max_steps=24, callbacks=[Record()], limit_val_batches=0).fit(model, dm)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)


def _layer0_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model.training_step(batch, 0).backward()
    attn = model.model.base_model.model.model.layers[0].self_attn.q_proj
    return attn.lora_A["default"].weight.grad.clone(), attn.lora_B["default"].weight.grad.clone()


def test_4bit_gradients_survive_an_eval_pass(tmp_path):
    """bitsandbytes repacks 4-bit CPU weights on a no-grad eval forward; gradients must not change after it."""
    L.seed_everything(0)
    dm = datamodule(tmp_path)
    dm.setup("fit")
    model = QLoRAModule(quantization="nf4", dropout=0.0, optimizer=sgd(1e-3))
    model.configure_model()
    with torch.no_grad():  # B starts at 0: give it a value so A's gradient is non-zero too
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = next(iter(dm.train_dataloader()))
    model.train()
    gA0, gB0 = _layer0_grads(model, batch)
    model.eval()
    with torch.no_grad():  # what validation, generation or Lightning's sanity check do
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    gA1, gB1 = _layer0_grads(model, batch)
    assert gB0.norm() > 1e-3 and gA0.norm() > 1e-5
    torch.testing.assert_close(gB1, gB0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gA1, gA0, rtol=1e-4, atol=1e-6)


def test_exported_adapter_loads_in_peft_and_reproduces_logits(tmp_path):
    from peft import PeftModel

    from fteval.models.loading import load_causal_lm

    L.seed_everything(0)
    dm = datamodule(tmp_path)
    model = QLoRAModule(quantization="nf4", r=4, alpha=8, target_modules=("q_proj", "o_proj", "down_proj"),
                        optimizer=adamw(1e-3), export_dir=str(tmp_path / "adapter"))
    trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, dm)
    out = tmp_path / "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "fteval_run.json").is_file()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30, 2]])
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
        base = load_causal_lm("embedded", quantization="nf4").model
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        got = loaded(input_ids=ids).logits
    assert not torch.equal(expected, base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else expected + 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_matches_uninterrupted_run(tmp_path):
    """4 steps straight vs 2 steps + resume from the step-2 checkpoint: same adapters.

    Tolerance 1e-5 relative: the runs execute the same float32 operations in the same order; the
    only allowed difference is summation-order noise inside BLAS on a different thread schedule.
    """
    kw = dict(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), optimizer=adamw(1e-3),
              warmup_steps=1)
    L.seed_everything(1)
    full = QLoRAModule(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, save_last=False)
    trainer(tmp_path / "a", max_steps=4, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(full, datamodule(tmp_path))
    step2 = sorted((tmp_path / "ck").glob("*step=2*.ckpt"))
    assert step2, list((tmp_path / "ck").iterdir())
    assert step2[0].stat().st_size < 5e6  # adapters + optimizer state only, never the frozen base (~540 MB)
    L.seed_everything(1)
    resumed = QLoRAModule(**kw)
    trainer(tmp_path / "b", max_steps=4, limit_val_batches=0).fit(resumed, datamodule(tmp_path), ckpt_path=str(step2[0]))
    a, b = _adapter_state(full), _adapter_state(resumed)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 30
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def test_checkpoint_from_another_method_or_base_is_refused(tmp_path):
    model = QLoRAModule(quantization="none", r=4)
    ckpt = {"state_dict": {}, "fteval": {"method": "grit", "base_model": "embedded", "r": 4,
                                         "target_modules": list(model.hparams.target_modules)}}
    with pytest.raises(ValueError, match="checkpoint method is 'grit' but this run has 'qlora'"):
        model.on_load_checkpoint(ckpt)
    ckpt["fteval"].update(method="qlora", base_model="meta-llama/Meta-Llama-3-8B-Instruct")
    with pytest.raises(ValueError, match="checkpoint base_model"):
        model.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not written by fteval"):
        model.on_load_checkpoint({"state_dict": {}})


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="learning rate 0.0 must be > 0"):
        trainer(tmp_path, max_steps=1).fit(QLoRAModule(quantization="none", optimizer=sgd(0.0)), datamodule(tmp_path))
    bad = QLoRAModule(quantization="none", target_modules=("qkv_fused",))
    with pytest.raises(ValueError, match=r"target_modules \['qkv_fused'\] match no layer.*q_proj"):
        bad.configure_model()
    with pytest.raises(ValueError, match="rank"):
        QLoRAModule(r=0)


def test_fit_keeps_the_4bit_base_dense_from_start_to_end():
    from fteval.models.dense4bit import dense_4bit_layers
    from fteval.models.loading import load_causal_lm

    module = QLoRAModule(quantization="nf4", r=4, alpha=8, target_modules=("q_proj",), optimizer=sgd(1e-3))
    module.setup_base_model(load_causal_lm("embedded", quantization="nf4").model)
    layers = dense_4bit_layers(module.model)
    module.on_fit_start()
    try:
        assert len(layers) == 30 * 7 and all(layer._fteval_dense_grad for layer in layers)
    finally:
        module.on_fit_end()
    assert not any(hasattr(layer, "_fteval_dense_grad") or "forward" in layer.__dict__ for layer in layers)
    compiled = QLoRAModule(quantization="nf4", r=4, target_modules=("q_proj",), compile_blocks=True)
    compiled.model = module.model
    compiled.on_fit_start()  # compiled blocks keep bitsandbytes' layers
    assert not any(hasattr(layer, "_fteval_dense_grad") for layer in layers)
    compiled.on_fit_end()
