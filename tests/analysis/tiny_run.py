"""An experiment database for the compare/report tests, replayed from a real tiny run through the real API.

``tiny_run.json`` holds what a real run wrote (2-core CPU, 2026-11-29): ``fteval fit`` with
configs/qlora.yaml and configs/grit.yaml (6 optimizer steps, validation every 2) and
``fteval test`` with configs/aqi.yaml on 20 safe + 20 unsafe prompts: experiment rows
(config, hardware, timestamps), every per-step metric, all 311 aqi_scores rows and the 4
statistical tests. :func:`build_database` writes them with :class:`fteval.db.ExperimentDB`
exactly as the run logger and the AQI evaluator do, so the rows have the real shapes; running
the pipeline itself takes minutes on this machine (GRIT ~40 s per step), too slow for a test.

The adapter folders are real PEFT-format files but small: 2 layers x (q_proj, v_proj) with
r = 16, d_in = d_out = 64, so the trainable parameters are 4 x (16 x 64 + 64 x 16) = 8192; the
GRIT folder's effective_rank.json gives ranks 8, 9, 3, 12 (mean 8, effective parameters
(8 + 9 + 3 + 12) x (64 + 64) = 4096).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fteval.db import ExperimentDB

RUN_FILE = Path(__file__).with_name("tiny_run.json")
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
EFFECTIVE_RANKS = [8, 9, 3, 12]
RANK, DIM = 16, 64
TRAINABLE = len(MODULES) * (RANK * DIM + DIM * RANK)  # 8192
EFFECTIVE_PARAMS = sum(EFFECTIVE_RANKS) * (DIM + DIM)  # 4096


def write_adapter(folder: Path, method: str) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors); GRIT adds effective_rank.json."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in MODULES:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, DIM, generator=gen)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(DIM, RANK, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": "embedded"}))
    if method == "grit":
        layers = {name: {"r": RANK, "n_a": 440, "n_g": 440, "energy_rank": k, "effective_rank": k, "adapter_rank": RANK}
                  for name, k in zip(MODULES, EFFECTIVE_RANKS)}
        (folder / "effective_rank.json").write_text(json.dumps(
            {"energy_threshold": 0.9, "effective_rank_source": "reprojection",
             "mean_effective_rank": sum(EFFECTIVE_RANKS) / len(EFFECTIVE_RANKS), "mean_adapter_rank": float(RANK),
             "layers": layers}))
    return folder


def build_database(root: Path) -> Path:
    """Replay tiny_run.json into ``root/centralized.db`` (adapters under ``root``); returns the database path."""
    recorded = json.loads(RUN_FILE.read_text())["experiments"]
    db_path = root / "centralized.db"
    ids: dict[int, int] = {}
    adapters: dict[str, str] = {}
    with ExperimentDB(db_path) as db:
        for exp in recorded:
            config = json.loads(json.dumps(exp["config"]))
            if exp["stage"] == "test":
                config["hparams"]["adapters"] = dict(adapters)
            eid = db.create_experiment(exp["name"], exp["method"], config, seed=exp["seed"],
                                       packages={"torch": torch.__version__}, hardware=exp["hardware"], stage=exp["stage"])
            ids[exp["id"]] = eid
            if exp["metrics"]:
                db.log_training_metrics(eid, exp["method"], [tuple(m) for m in exp["metrics"]])
            if exp["stage"] == "fit":
                ckpt = root / f"{exp['method']}_last.ckpt"
                ckpt.write_bytes(b"adapter-only checkpoint stand-in")
                db.add_artifact(eid, "checkpoint_last", ckpt)
                folder = write_adapter(root / exp["method"], exp["method"])
                adapters[exp["method"]] = str(folder)
                db.add_artifact(eid, "adapter", folder)
            if exp["aqi_scores"]:
                with db.transaction():
                    for t in exp["statistical_tests"]:
                        db.add_statistical_test(t.pop("test"), t.pop("metric"), experiment_id=eid, **t)
                    db.add_aqi_scores(eid, exp["aqi_scores"])
            db.finish_experiment(eid, exp["status"])
            with db.transaction():  # the recorded wall-clock span (costs are computed from it)
                db.conn.execute("UPDATE experiments SET started_at = ?, finished_at = ? WHERE id = ?",
                                (exp["started_at"], exp["finished_at"], eid))
    return db_path
