"""QDoRAModule and LoRAModule on the embedded model: the base each one trains on, DoRA's magnitude
vectors in the trained and exported adapter, the PEFT export loading back, bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from fteval.methods import get_method, method_of
from fteval.models import LoRAModule, QDoRAModule
from tests.models.test_qlora import adamw, datamodule, trainer


def _fit(tmp_path, module, steps=3):
    L.seed_everything(0)
    trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(module, datamodule(tmp_path, n_train=12))
    return module


def test_qdora_trains_dora_on_the_4bit_base_and_exports_a_peft_adapter(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    module = QDoRAModule(quantization="nf4", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"),
                         optimizer=adamw(5e-3), lr_schedule="constant", export_dir=str(tmp_path / "adapter"))
    assert method_of(module) is get_method("qdora") and get_method("qdora").quantises_base
    module.configure_model()
    q_proj = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)  # the 4-bit base
    magnitude = q_proj.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and magnitude.shape == (q_proj.out_features,)
    m0 = magnitude.detach().clone()
    _fit(tmp_path, module)
    assert not torch.allclose(m0, q_proj.lora_magnitude_vector["default"].weight.detach())  # DoRA's magnitude trained

    out = tmp_path / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4 and config["base_model_name_or_path"] == "embedded"
    tensors = load_file(out / "adapter_model.safetensors")
    n_layers = len(module.model.base_model.model.model.layers)
    assert sum("lora_magnitude_vector" in k for k in tensors) == 2 * n_layers  # q_proj and v_proj
    assert json.loads((out / "fteval_run.json").read_text())["method"] == "qdora"

    # the folder loads with plain peft and gives the trained model's outputs
    from fteval.models.loading import load_causal_lm

    base = load_causal_lm("embedded", quantization="nf4").model
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    module.model.eval()
    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_trains_on_the_full_precision_base(tmp_path):
    module = LoRAModule(r=4, alpha=8, dropout=0.0, target_modules=("q_proj",), optimizer=adamw(5e-3),
                        lr_schedule="constant", export_dir=str(tmp_path / "adapter"))
    assert module.hparams.quantization == "none" and not get_method("lora").quantises_base
    module.configure_model()
    q_proj = module.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear and q_proj.base_layer.weight.dtype == torch.float32
    _fit(tmp_path, module)
    b = q_proj.lora_B["default"].weight
    assert b.abs().max() > 0  # trained from B = 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is False and json.loads((tmp_path / "adapter" / "fteval_run.json").read_text())["method"] == "lora"


def test_lora_refuses_a_quantised_base():
    with pytest.raises(ValueError, match="plain LoRA trains on a full-precision base; set quantization: none"):
        LoRAModule(quantization="nf4")
