"""DDP on CPU (gloo, 2 processes) through the real command line: identical ranks, same AQI as 1 process."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import accd_rows, alignment_rows, write_jsonl

pytestmark = pytest.mark.slow


def fteval(*args, timeout=900):
    res = subprocess.run([sys.executable, "-m", "fteval", *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return root, write_jsonl(root / "t.jsonl", alignment_rows(24)), write_jsonl(root / "e.jsonl", accd_rows(10, 10))


@pytest.mark.parametrize("method", ["qlora", "grit"])
def test_two_process_fit_gives_identical_parameters(method, data):
    root, train, evals = data
    dump = root / f"dump-{method}"
    callbacks = [{"class_path": "callbacks.ddp_check.RankConsistencyCheck", "init_args": {"dump_dir": str(dump)}}]
    if method == "grit":
        callbacks = [{"class_path": "callbacks.kfac.KFACPreconditioner", "init_args": {"update_freq": 1, "min_samples": 8}},
                     {"class_path": "callbacks.reprojection.NeuralReprojection", "init_args": {"every_n_steps": 2, "top_k": 2, "min_samples": 8}},
                     *callbacks]
    fteval("fit", "--config", f"configs/{method}.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1",
           "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.default_root_dir", str(root), "--trainer.enable_checkpointing", "false",
           "--trainer.callbacks", json.dumps(callbacks), "--model.init_args.r", "4",
           "--model.init_args.target_modules", "[q_proj, v_proj]", "--model.init_args.export_dir", str(root / method),
           "--data.train_source", str(train), "--data.eval_source", str(evals), "--data.max_length", "48",
           "--data.output_dir", str(root / "stats"))
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) == 2 * 2 * 30
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    lora_b = [v for k, v in r0.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # training moved the adapters
    assert (root / method / "adapter_model.safetensors").is_file()


def test_aqi_on_two_processes_equals_one(data):
    root, _, evals = data
    results = {}
    for devices in ("1", "2"):
        out = root / f"aqi-{devices}"
        fteval("test", "--config", "configs/aqi.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", devices,
               "--trainer.strategy", "ddp" if devices == "2" else "auto", "--trainer.logger", "false",
               "--trainer.default_root_dir", str(out),
               "--trainer.callbacks", "[]", "--model.init_args.adapters", "{}", "--model.init_args.quantization", "none",
               "--model.init_args.n_bootstrap", "100", "--model.init_args.results_dir", str(out),
               "--model.init_args.behaviour_prompts_per_class", "4", "--model.init_args.max_new_tokens", "8",
               "--data.eval_source", str(evals), "--data.n_per_class", "9", "--data.eval_batch_size", "4",
               "--data.output_dir", str(root / "stats"))
        results[devices] = json.loads((out / "aqi_results.json").read_text())
    one, two = results["1"]["models"]["baseline"], results["2"]["models"]["baseline"]
    assert one["n_prompts"] == two["n_prompts"] == 18  # 9 + 9, padding duplicates of the sampler removed
    for metric in ("aqi", "aqi_bounded", "xbi", "chi"):
        assert two["scores"][metric] == pytest.approx(one["scores"][metric], rel=1e-5), metric
    # Behaviour: the same 4 + 4 prompts answered (greedy) on 1 and 2 processes, so the same rates.
    assert two["behaviour"]["n_prompts"] == one["behaviour"]["n_prompts"] == 8
    assert two["behaviour"]["rates"] == one["behaviour"]["rates"]
