"""`fteval merge`: the merged model reproduces base + adapter and nothing is written on failure."""

import pytest
import torch

from fteval.__main__ import main
from tests.eval.test_module import make_adapter


def test_merge_writes_a_full_model_with_the_adapters_logits(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fteval.models.loading import load_causal_lm

    adapter = make_adapter(tmp_path / "adapter", 0.05)
    main(["merge", str(adapter), str(tmp_path / "merged"), "--quantization", "none"])
    assert "max |logit(merged) - logit(base + adapter)|" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_causal_lm("embedded").model, str(adapter)).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path), str(tmp_path / "merged")])
    assert exit_.value.code == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
