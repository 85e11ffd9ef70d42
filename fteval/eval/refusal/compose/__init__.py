"""The composed part of the refusal development set: model-family voices, topics and phenomena
(:mod:`.build` writes ``tests/data/refusal_dev_composed.jsonl``)."""
