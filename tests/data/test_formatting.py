import torch

import pytest

from fteval.data.formatting import IGNORE_INDEX, format_prompt, generation_suffix_tokens, pad_batch, tokenize_example


def test_chat_template_and_response_only_labels(tokenizer):
    ex = tokenize_example(tokenizer, "What is 2+2?", "It is 4.", max_length=256)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    n_prompt = sum(1 for t in labels if t == IGNORE_INDEX)
    prompt_text = tokenizer.decode(ids[:n_prompt])
    assert prompt_text.endswith("<|im_start|>assistant\n")  # ChatML, from the tokenizer's own template
    assert "What is 2+2?" in prompt_text
    assert tokenizer.decode(labels[n_prompt:]) == "It is 4.<|im_end|>\n"
    assert all(t != IGNORE_INDEX for t in labels[n_prompt:])


def test_truncation_keeps_prompt_and_drops_examples_without_room(tokenizer):
    ex = tokenize_example(tokenizer, "Hi", "word " * 200, max_length=40)
    assert len(ex["input_ids"]) == 40
    assert tokenize_example(tokenizer, "long " * 100, "answer", max_length=40) is None


def test_llama2_fallback_format(tokenizer):
    text = format_prompt(tokenizer, "Hello", template="llama2-inst")
    assert text == "<s>[INST] Hello [/INST]"


def test_generation_suffix_is_the_assistant_header(tokenizer):
    n = generation_suffix_tokens(tokenizer)
    for prompt in ("What is 2+2?", "How do I kill a Python process", "  spaced  "):
        ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids[-n:]) == "<|im_end|>\n<|im_start|>assistant\n"  # ChatML's post-instruction tokens
        assert prompt.strip() in tokenizer.decode(ids[:-n])
    assert n == 6  # <|im_end|> \n <|im_start|> ass istant \n
    with_system = generation_suffix_tokens(tokenizer, system_prompt="Be brief.")
    assert with_system == n
    llama2 = generation_suffix_tokens(tokenizer, template="llama2-inst")
    ids = tokenizer(format_prompt(tokenizer, "Hello", template="llama2-inst"), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-llama2:]).strip() == "[/INST]"


def test_generation_suffix_needs_the_message_kept(tokenizer):
    class Rewriting:
        chat_template = "x"

        def apply_chat_template(self, messages, **kwargs):
            return "<user>" + messages[-1]["content"].upper() + "</user>"

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    with pytest.raises(ValueError, match="tokens='prompt'"):
        generation_suffix_tokens(Rewriting())


def test_pad_batch_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 0}, {"input_ids": [8], "labels": [8], "index": 1}]
    right = pad_batch(feats, pad_token_id=0, side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert torch.equal(right["index"], torch.tensor([0, 1]))
    left = pad_batch(feats, pad_token_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
