"""The stages of ``fteval bench controls``: each a real ``fteval`` command on a config derived from the user's.

A stage is one ``fit``, ``merge`` or ``test`` run (or the zero adapter, written with peft). Its
config is the method's YAML (``configs/qlora.yaml``, ``configs/grit.yaml``, ``configs/aqi.yaml`` or
the paper-scale ones) with only what the controls must set changed: base model, training file,
steps, seed, export folder, results folder, logger and database. The derived YAML is written into
the stage's folder, so any stage can be re-run by hand with ``python -m fteval fit --config
<stage>/config.yaml``.

Restarting: a finished stage leaves ``stage.json`` holding the hash of its config, of the data
files it read and of the stages it read; a later run skips it when that hash is unchanged and re-runs it (and, through the
hashes, everything downstream) when anything it depends on changed. An interrupted stage has no
``stage.json`` and runs again from its start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from fteval.io import write_json_atomic, write_text_atomic

__all__ = ["Stage", "derive_fit_config", "file_digest", "derive_test_config", "load_yaml", "run_stage", "write_zero_adapter"]

DONE = "stage.json"


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist; pass --configs a folder holding qlora.yaml, grit.yaml "
                                "and aqi.yaml (configs or configs/llama3-8b)")
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or "model" not in cfg or "trainer" not in cfg:
        raise ValueError(f"config {path} is not an fteval fit/test config (no 'trainer' and 'model' sections)")
    return cfg


def _set_callback_arg(cfg: dict, class_suffix: str, **init_args: Any) -> None:
    for cb in cfg["trainer"].get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith(class_suffix):
            cb.setdefault("init_args", {}).update(init_args)


def _common(cfg: dict, *, seed: int, logs: Path, name: str, db_path: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["seed_everything"] = int(seed)
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(logs), "name": name}}
    _set_callback_arg(cfg, "ExperimentDBLogger", db_path=str(db_path))
    return cfg


def derive_fit_config(base: dict, *, base_model: str, train_file: Path, eval_source: str, steps: int, seed: int,
                      export_dir: Path, logs: Path, name: str, db_path: Path, data_dir: Path,
                      quantization: Optional[str] = None, lr: Optional[float] = None,
                      max_length: Optional[int] = None, monitor: bool = False) -> dict:
    """A fit config: ``base`` (a method's YAML) trained on ``train_file`` for ``steps`` optimizer steps.

    Checkpoints are kept (last only: a killed stage restarts, it does not resume), validation
    runs once, at the end, and the alignment monitor only with ``monitor`` (the controls' test
    measures the same thing at the end, on more prompts).
    """
    cfg = _common(base, seed=seed, logs=logs, name=name, db_path=db_path)
    tr = cfg["trainer"]
    tr["max_steps"] = int(steps)
    tr["val_check_interval"] = int(steps) * int(tr.get("accumulate_grad_batches") or 1)
    tr["check_val_every_n_epoch"] = None
    tr.pop("max_epochs", None)
    _set_callback_arg(cfg, "ModelCheckpoint", save_top_k=0, every_n_train_steps=int(steps))
    _set_callback_arg(cfg, "AlignmentMonitor", enabled=bool(monitor))
    args = cfg["model"].setdefault("init_args", {})
    args["model_name_or_path"] = base_model
    args["export_dir"] = str(export_dir)
    if quantization is not None:
        args["quantization"] = quantization
    if lr is not None:
        args.setdefault("optimizer", {"class_path": "torch.optim.AdamW"}).setdefault("init_args", {})["lr"] = float(lr)
    data = cfg.setdefault("data", {})
    data.update(train_source=str(train_file), train_preset="accepted", eval_source=eval_source,
                output_dir=str(data_dir), seed=int(seed))
    data.pop("prompt_field", None)
    data.pop("response_field", None)
    if max_length is not None:
        data["max_length"] = int(max_length)
    return cfg


def derive_test_config(base: dict, *, base_model: str, adapters: dict[str, str], eval_source: str,
                       results_dir: Path, logs: Path, name: str, db_path: Path, data_dir: Path,
                       n_per_class: int, behaviour_prompts_per_class: int, max_new_tokens: int,
                       quantization: Optional[str] = None, geval: Optional[bool] = None,
                       tokens: Optional[str] = None) -> dict:
    """A test config: ``base`` (an AQI YAML) evaluating ``base_model`` and ``adapters`` on ``eval_source``.

    ``quantization``, ``geval`` and ``tokens`` override the YAML's own when given."""
    cfg = _common(base, seed=42, logs=logs, name=name, db_path=db_path)
    args = cfg["model"].setdefault("init_args", {})
    args.update(model_name_or_path=base_model, adapters=dict(adapters), results_dir=str(results_dir), behaviour=True,
                behaviour_prompts_per_class=int(behaviour_prompts_per_class), max_new_tokens=int(max_new_tokens))
    if quantization is not None:
        args["quantization"] = quantization
    if geval is not None:
        args["geval"] = bool(geval)
    if tokens is not None:
        args["tokens"] = tokens
    data = cfg.setdefault("data", {})
    data.update(eval_source=eval_source, n_per_class=int(n_per_class), output_dir=str(data_dir))
    return cfg


def write_zero_adapter(base_model: str, like_config: dict, out: Path, quantization: str) -> None:
    """A LoRA adapter whose update is exactly zero (peft's default init: B = 0), for the null control.

    ``like_config``: a fit config whose rank, alpha and target modules the adapter copies. The
    adapter's ``fteval_run.json`` names ``base_model``, so ``fteval test`` attaches it to that base.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from fteval.io import atomic_directory
    from fteval.models.loading import load_causal_lm

    args = like_config["model"].get("init_args", {})
    loaded = load_causal_lm(base_model, quantization="none", dtype=torch.float32)
    config = LoraConfig(r=int(args.get("r", 16)), lora_alpha=float(args.get("alpha", 32)), lora_dropout=0.0,
                        target_modules=list(args.get("target_modules") or ["q_proj", "v_proj"]),
                        init_lora_weights=True, task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, config)
    if any(float(p.detach().abs().max()) != 0.0 for n, p in model.named_parameters() if "lora_B" in n):
        raise RuntimeError("peft's default LoRA init no longer sets B = 0; the zero adapter would not be zero")
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "fteval_run.json").write_text(json.dumps(
            {"method": "zero", "base_model": base_model, "r": config.r,
             "hparams": {"quantization": quantization, "note": "untrained LoRA adapter, B = 0: its update is zero"}},
            indent=2))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes ('' for a path that is not a file, e.g. 'sample' or a hub id)."""
    path = Path(path)
    if not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stage:
    """One step of the controls: ``run(config_path)`` does the work, ``inputs`` name the stages it reads."""

    name: str
    folder: Path
    config: dict
    run: Callable[[Path], None]
    inputs: list["Stage"] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # data files read: their content is part of the key
    seconds: Optional[float] = None
    skipped: bool = False

    def key(self) -> str:
        payload = json.dumps({"config": self.config, "inputs": [s.key() for s in self.inputs],
                              "files": [file_digest(f) for f in self.files]}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def is_done(self) -> bool:
        marker = self.folder / DONE
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("key") == self.key()
        except ValueError:
            return False


def run_stage(stage: Stage, index: int, total: int, fresh: bool = False) -> None:
    """Run ``stage`` unless a finished run with the same key is on disk (``fresh``: always run)."""
    label = f"[controls {index}/{total}] {stage.name}"
    if not fresh and stage.is_done():
        stage.skipped = True
        stage.seconds = float(json.loads((stage.folder / DONE).read_text()).get("seconds", 0.0))
        print(f"{label}: done earlier, skipped ({stage.folder / DONE})", flush=True)
        return
    stage.folder.mkdir(parents=True, exist_ok=True)
    (stage.folder / DONE).unlink(missing_ok=True)
    config_path = stage.folder / "config.yaml"
    write_text_atomic(config_path, yaml.safe_dump(stage.config, sort_keys=False))
    print(f"{label} ...", flush=True)
    start = time.perf_counter()
    stage.run(config_path)
    stage.seconds = time.perf_counter() - start
    write_json_atomic(stage.folder / DONE, {"key": stage.key(), "seconds": stage.seconds, "stage": stage.name})
    print(f"{label}: finished in {stage.seconds:.0f} s", flush=True)
