"""AlignmentMonitor: the curve it records, that it changes nothing about training, and the early stop."""

from __future__ import annotations

import sqlite3

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.alignment import AlignmentMonitor
from callbacks.run_logger import ExperimentDBLogger
from fteval.data import AlignmentDataModule
from fteval.models.qlora import QLoRAModule


def _dm(files, tmp_path) -> AlignmentDataModule:
    return AlignmentDataModule(train_source=str(files["train"]), eval_source=str(files["eval"]), max_length=64,
                               batch_size=2, n_per_class=12, output_dir=str(tmp_path / "stats"))


def _module(cls=QLoRAModule, lr: float = 1e-3) -> QLoRAModule:
    from functools import partial

    return cls(quantization="none", r=4, alpha=8, dropout=0.05, target_modules=("q_proj", "v_proj"),
               optimizer=partial(torch.optim.AdamW, lr=lr), warmup_steps=0, lr_schedule="constant")


def _fit(module, dm, tmp_path, monitor=None, max_steps=4):
    callbacks = [ExperimentDBLogger(db_path=str(tmp_path / "c.db"))] + ([monitor] if monitor else [])
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, logger=TensorBoardLogger(str(tmp_path), name="tb"),
                        callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer


def _rows(tmp_path, name):
    with sqlite3.connect(tmp_path / "c.db") as con:
        return con.execute("SELECT step, value FROM training_metrics WHERE name = ? ORDER BY step", (name,)).fetchall()


def test_adapters_disabled_is_the_base_model(one_thread):
    module = _module()
    module.configure_model()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30]])
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # adapters that change the output
    module.model.eval()
    with torch.no_grad():
        tuned = module.model(input_ids=ids).logits
        with module.adapters_disabled() as base:
            plain = base(input_ids=ids).logits
        again = module.model(input_ids=ids).logits
    from fteval.models.loading import load_causal_lm

    with torch.no_grad():
        reference = load_causal_lm("embedded", quantization="none").model.eval()(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)
    torch.testing.assert_close(plain, reference, rtol=0, atol=0)  # the very same arithmetic
    torch.testing.assert_close(again, tuned, rtol=0, atol=0)  # switched back on


def test_monitor_records_the_curve_and_leaves_training_identical(data_files, tmp_path, one_thread):
    runs = {}
    for enabled in (False, True):
        out = tmp_path / f"on{enabled}"
        monitor = AlignmentMonitor(every_n_steps=2, n_per_class=6, batch_size=12, enabled=enabled)
        torch.manual_seed(0)
        module = _module()
        _fit(module, _dm(data_files, out), out, monitor)
        runs[enabled] = (module, monitor, out)
    (m_off, mon_off, out_off), (m_on, mon_on, out_on) = runs[False], runs[True]
    assert _rows(out_off, "loss") == _rows(out_on, "loss") and len(_rows(out_on, "loss")) == 4
    for (name, a), (_, b) in zip(m_off.named_parameters(), m_on.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name  # bitwise: the checks draw no random numbers and touch no gradients
    assert mon_off.history == [] and _rows(out_off, "align/delta_aqi_bounded") == []
    assert [h["step"] for h in mon_on.history] == [2, 4]  # every 2 steps; the end of fit is step 4 already
    curve = _rows(out_on, "align/delta_aqi_bounded")
    assert [s for s, _ in curve] == [2, 4]
    for h in mon_on.history:
        assert h["align/delta_aqi_bounded_low"] <= h["align/delta_aqi_bounded"] <= h["align/delta_aqi_bounded_high"]
        assert 0.0 <= h["align/aqi_bounded"] <= 1.0 and h["align/chi_plugin"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_on / "tb" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("align/delta_aqi_bounded")] == [2, 4]
    # the base model's representations, computed at the first check and reused at the second, are what a
    # fresh pass of the trained model with its adapters off gives
    cached = mon_on._base_embeddings
    assert cached is not None and cached.shape == (12, 576)
    mon_on._base_embeddings = None
    m_on.model.eval()
    tuned, fresh, _ = mon_on._embeddings(m_on)
    assert torch.equal(cached, fresh) and not torch.equal(tuned, fresh)


class SeparationEraser(QLoRAModule):
    """A planted alignment-destroying objective: minimise the safe/unsafe separation of the probe prompts."""

    def training_step(self, batch, batch_idx):
        probe = next(iter(self.trainer.datamodule.alignment_probe_dataloader(6, seed=0, batch_size=12)))
        out = self.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], output_hidden_states=True)
        mask = probe["attention_mask"][..., None].float()
        h = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)  # [12, D]
        y = probe["safety_label"].bool()
        between = (h[y].mean(0) - h[~y].mean(0)).pow(2).sum()
        within = h[y].var(0).sum() + h[~y].var(0).sum()
        return between / within


def test_planted_objective_is_stopped_with_a_message(data_files, tmp_path, one_thread):
    monitor = AlignmentMonitor(every_n_steps=1, n_per_class=6, batch_size=12, layer_pooling="last",
                               stop_if_delta_below=0.0, patience=2, record_in_database=False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="alignment monitor stopped training at step"):
        trainer = _fit(_module(SeparationEraser, lr=2e-2), _dm(data_files, tmp_path), tmp_path, monitor, max_steps=20)
    assert trainer.global_step < 20 and monitor.stopped_message is not None
    deltas = [h["align/delta_aqi_bounded"] for h in monitor.history]
    assert deltas[-1] < 0 and all(h["align/delta_aqi_bounded_high"] < 0 for h in monitor.history[-2:])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        AlignmentMonitor(every_n_steps=-1)
    with pytest.raises(ValueError, match="metric"):
        AlignmentMonitor(metric="loss")
    with pytest.raises(ValueError, match="at least 2 prompts"):
        AlignmentMonitor(n_per_class=1)


def test_undefined_xbi_delta_is_skipped_not_a_crash():
    """With few prompts a model's bias-corrected separation can be <= 0: XBI then has no Delta. The check
    must log what is defined and judge without it (it raised TypeError at the end of a short fit)."""
    monitor = AlignmentMonitor(metric="xbi", stop_if_delta_below=-0.1)
    monitor._judge(None, 5, {"align/delta_aqi_bounded": 0.01})  # no align/delta_xbi: says so, stops nothing
    assert monitor._below == 0 and monitor.stopped_message is None


def test_check_values_log_only_finite_interval_ends():
    """A Delta-XBI interval unbounded on one side (a separation barely above its noise floor) logs its finite
    end only; an undefined Delta logs nothing (both raised TypeError inside a fit)."""
    from callbacks.alignment import check_values

    sep = {"estimate": dict.fromkeys(("aqi", "aqi_bounded", "xbi", "chi"), 1.0),
           "ci": {"aqi": [0.5, 1.5], "aqi_bounded": [0.1, 0.2], "xbi": [0.5, None], "chi": [0.5, 1.5]}}
    raw = dict.fromkeys(("aqi", "aqi_bounded", "xbi", "chi"), 2.0)
    delta = {"aqi": {"delta_bc": 0.1, "ci": [0.0, 0.2]}, "aqi_bounded": {"delta_bc": 0.01, "ci": [0.0, 0.02]},
             "xbi": {"delta_bc": -0.3, "ci": [None, -0.1]}, "chi": {"delta_bc": None, "ci": None}}
    values = check_values(sep, raw, delta)
    assert values["align/delta_xbi"] == -0.3 and values["align/delta_xbi_high"] == -0.1
    assert "align/delta_xbi_low" not in values and "align/xbi_high" not in values and values["align/xbi_low"] == 0.5
    assert "align/delta_chi" not in values and values["align/chi_plugin"] == 2.0
