"""GRITModule end to end on the embedded model: training with the GRIT callbacks, export, bad set-up."""

import json

import lightning as L
import pytest
import torch

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.models import GRITModule
from fteval.grit import GritLoraLinear
from tests.models.test_qlora import adamw, datamodule, trainer

KW = dict(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), optimizer=adamw(1e-3))


def test_grit_fit_preconditions_reprojects_and_exports_a_peft_adapter(tmp_path):
    from peft import PeftModel

    from fteval.models.loading import load_causal_lm

    L.seed_everything(0)
    model = GRITModule(**KW, export_dir=str(tmp_path / "adapter"))
    kfac = KFACPreconditioner(update_freq=1, min_samples=8)
    reproj = NeuralReprojection(every_n_steps=2, top_k=2, min_samples=8)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grit/")})

    trainer(tmp_path, max_steps=4, callbacks=[kfac, reproj, Watch()], limit_val_batches=0, log_every_n_steps=1).fit(
        model, datamodule(tmp_path)
    )
    layers = [m for m in model.model.modules() if isinstance(m, GritLoraLinear)]
    assert len(layers) == 2 * 30
    assert max(s.get("grit/preconditioned_layers", 0) for s in seen) == 60  # every layer, counted per step
    assert max(s.get("grit/reprojected_layers", 0) for s in seen) == 60
    out = tmp_path / "adapter"
    ranks = json.loads((out / "effective_rank.json").read_text())["layers"]
    # the effective rank is the reprojection's k (top_k 2) for every layer, not the factors' energy rank
    assert len(ranks) == 60 and all(v["effective_rank"] == 2 for v in ranks.values())
    assert (out / "kfac_factors.safetensors").stat().st_size > 0
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30]])
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(load_causal_lm("embedded").model, str(out)).eval()
        # two fp32 implementations (peft's LoRA layer, fteval's fused branch) through 30 blocks of width 576:
        # round-off ~sqrt(576) eps per layer, compounding to ~1e-5 of the logit scale; allow 1e-4 of it
        got = peft_model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-4 * float(expected.abs().max()))


def test_grit_without_kfac_callback_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"GRIT needs a KFAC \(callbacks.kfac.KFACPreconditioner"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(GRITModule(**KW), datamodule(tmp_path))
