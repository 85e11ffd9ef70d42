"""The test loop's variants on one loaded 4-bit base equal separately loaded models, bitwise."""

import pytest
import torch

from fteval.eval.module import AQIEvaluator
from fteval.models.dense4bit import dense_4bit_inference
from tests.eval.test_module import make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30, 2], [1, 504, 9202, 314, 260, 30, 2, 0]])  # right-padded
MASK = (IDS != 0).long()


def _hidden(model) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True, logits_to_keep=1).hidden_states


def test_one_base_with_switched_adapters_equals_separate_loads(tmp_path):
    from peft import PeftModel

    from fteval.models.loading import load_causal_lm

    paths = {"a": make_adapter(tmp_path / "a", 0.05, seed=1), "b": make_adapter(tmp_path / "b", 0.05, seed=2)}
    ev = AQIEvaluator(quantization="nf4", adapters={k: str(v) for k, v in paths.items()}, behaviour=False)
    ev.configure_model()
    got = {}
    with dense_4bit_inference(ev.model) as n:  # as the test loop runs: one base, dequantised once
        assert n == 210
        for name in ("a", "baseline", "b", "a"):  # switching back and forth changes nothing
            with ev.variant(name) as model:
                got.setdefault(name, []).append(_hidden(model))
    want = {"baseline": _hidden(load_causal_lm("embedded", quantization="nf4").model.eval())}
    for name, path in paths.items():
        alone = PeftModel.from_pretrained(load_causal_lm("embedded", quantization="nf4").model, str(path)).eval()
        want[name] = _hidden(alone)
    for name, runs in got.items():
        for hidden in runs:
            assert len(hidden) == 31
            assert all(torch.equal(h, w) for h, w in zip(hidden, want[name])), name
    assert not torch.equal(want["a"][-1], want["baseline"][-1]) and not torch.equal(want["a"][-1], want["b"][-1])
