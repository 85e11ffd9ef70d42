"""Environment manifest (m01): what this machine has, and whether it can run a given config.

``collect_manifest()`` describes the interpreter, the packages fteval depends on, CPU,
RAM, CUDA and GPUs, and whether a Hugging Face token is configured: only a boolean and
where it was found (``env:HF_TOKEN``, ``env:HUGGING_FACE_HUB_TOKEN`` or ``file``). The token
file is never opened and the token's value is never read into the manifest.

``env()`` is the ``fteval env`` command; ``check_config()`` is its ``--check``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fteval.io import write_json_atomic

__all__ = [
    "PACKAGES",
    "check_config",
    "collect_manifest",
    "env",
    "git_commit",
    "hf_token_source",
    "load_config",
    "package_versions",
]

# Distributions whose versions go into every manifest and experiment row (None = not installed).
PACKAGES = (
    "fteval", "torch", "lightning", "transformers", "peft", "bitsandbytes", "flash-attn", "accelerate",
    "torchmetrics", "datasets", "tokenizers", "safetensors", "huggingface-hub", "jsonargparse", "numpy",
    "scipy", "scikit-learn", "gguf", "tensorboard", "pyarrow", "psutil", "pyyaml", "llama-cpp-python", "vllm",
)
_GIB = 1024**3


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, Optional[str]]:
    """Installed version of each distribution (importlib.metadata), None when absent."""
    out: dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hf_token_source(environ: Mapping[str, str] = os.environ, token_path: Optional[Path] = None) -> Optional[str]:
    """Where a Hugging Face token is configured, without reading it: an env var name, ``file`` or None.

    Args:
        environ: the environment to look in.
        token_path: the huggingface_hub token file; default ``huggingface_hub.constants.HF_TOKEN_PATH``
            (``$HF_HOME/token``). Only its size is looked at.
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if environ.get(var, "").strip():
            return f"env:{var}"
    if token_path is None:
        try:
            from huggingface_hub import constants

            token_path = Path(constants.HF_TOKEN_PATH)
        except ImportError:
            home = environ.get("HF_HOME") or Path(environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
            token_path = Path(home) / "token"
    try:
        return "file" if token_path.is_file() and token_path.stat().st_size > 0 else None
    except OSError:
        return None


def git_commit(cwd: Optional[Path] = None) -> Optional[str]:
    """``git rev-parse HEAD`` in ``cwd`` (default: the current folder); None outside a repository or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _hardware() -> dict[str, Any]:
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    hw: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / _GIB, 2),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,  # CUDA version torch was built with (None on CPU builds)
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "gpus": [],
        "bf16_supported": None,  # on the GPU; None without CUDA (CPU autocast always has bf16)
        "bitsandbytes_cuda": None,  # True when bitsandbytes loaded its CUDA library
        "flash_attn_importable": importlib.util.find_spec("flash_attn") is not None,
    }
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            hw["gpus"].append({
                "index": i, "name": p.name, "memory_gib": round(p.total_memory / _GIB, 2),
                "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8,  # bf16 tensor cores from Ampere (sm80)
            })
        hw["bf16_supported"] = all(g["bf16"] for g in hw["gpus"])
        if importlib.util.find_spec("bitsandbytes") is not None:
            try:
                from bitsandbytes.cextension import CudaBNBNativeLibrary, lib

                hw["bitsandbytes_cuda"] = isinstance(lib, CudaBNBNativeLibrary)
            except Exception:  # a broken install is "no CUDA support", not a crash of the manifest
                hw["bitsandbytes_cuda"] = False
    elif importlib.util.find_spec("bitsandbytes") is not None:
        hw["bitsandbytes_cuda"] = False
    return hw


def collect_manifest() -> dict[str, Any]:
    """Describe this machine and interpreter (JSON-serialisable; never contains a token).

    Returns:
        ``created_at`` (UTC ISO time), ``hostname``, ``python``, ``python_executable``,
        ``platform``, ``packages`` (name -> version or None), ``hardware`` (CPU count,
        RAM in GiB, CUDA, ``gpus`` with memory in GiB and compute capability, bf16,
        bitsandbytes CUDA, flash-attn), ``hf_token_present`` (bool) and
        ``hf_token_source`` (where it was found, or None).
    """
    source = hf_token_source()
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(),
        "hardware": _hardware(),
        "hf_token_present": source is not None,
        "hf_token_source": source,
    }


# -- --check -----------------------------------------------------------------------------------
def load_config(path: Path) -> dict[str, Any]:
    """Read a LightningCLI YAML config into a dict (clear errors for a missing or malformed file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config {path} does not exist; pass the YAML you would give to `fteval fit --config`.")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"Config {path} is not valid YAML: {err}") from err
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"Config {path} must be a YAML mapping (trainer:, model:, ...), got {type(cfg).__name__}.")
    return cfg


def _find_key(tree: Any, key: str) -> Any:
    """First value stored under ``key`` anywhere in a nested dict/list (depth-first), else None."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def _quant_bits(cfg: Mapping[str, Any]) -> Optional[int]:
    """4 or 8 when the model section asks for bitsandbytes quantisation, else None."""
    model = cfg.get("model", cfg)
    for key in ("load_in_4bit", "load_in_8bit"):
        if _find_key(model, key) is True:
            return 4 if "4" in key else 8
    value = _find_key(model, "quantize")
    if value is None:
        value = _find_key(model, "quantization")
    text = str(value).lower() if value is not None else ""
    if value is True or any(t in text for t in ("nf4", "fp4", "4bit", "4-bit", "int4")):
        return 4
    if any(t in text for t in ("8bit", "8-bit", "int8", "llm.int8")):
        return 8
    return None


def check_config(cfg: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    """Reasons this machine (``manifest``) cannot run the LightningCLI config ``cfg``; empty = it can.

    The lookup is tolerant of where keys sit: ``trainer.accelerator``, ``trainer.devices`` and
    ``trainer.precision`` are read from the ``trainer`` section; ``quantize`` / ``quantization``
    (values such as ``nf4``, ``fp4``, ``int8``, ``true``), ``load_in_4bit`` / ``load_in_8bit``
    and ``attn_implementation`` are found at any depth under ``model`` (``model.init_args.*``,
    ``model.init_args.model.*``, ...). Missing keys are taken as Lightning's defaults
    (accelerator ``auto``, fp32, no quantisation, no flash attention).

    Checks: a GPU accelerator without CUDA, more devices than GPUs, bf16 on a GPU without
    bf16, fp16 autocast on CPU (Lightning refuses it), 4/8-bit without bitsandbytes or
    without its CUDA library on a GPU run, ``flash_attention_2`` without flash_attn or CUDA.
    """
    hw = manifest.get("hardware", {})
    pkgs = manifest.get("packages", {})
    cuda = bool(hw.get("cuda_available"))
    n_gpus = len(hw.get("gpus") or [])
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    precision = str(trainer.get("precision") if trainer.get("precision") is not None else "32-true").lower()
    devices = trainer.get("devices", "auto")
    reasons: list[str] = []

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda)
    if accelerator in ("gpu", "cuda") and not cuda:
        reasons.append(
            f"trainer.accelerator is {accelerator!r} but CUDA is not available here "
            f"(torch {pkgs.get('torch')}, built for CUDA {hw.get('cuda_version')}); use accelerator: cpu or a GPU machine."
        )
    if on_gpu and cuda:
        wanted = None
        if isinstance(devices, int) and devices > 0:
            wanted = devices
        elif isinstance(devices, str) and devices.isdigit():
            wanted = int(devices)
        elif isinstance(devices, list) and devices:
            wanted = max(int(d) for d in devices) + 1
        if wanted is not None and wanted > n_gpus:
            reasons.append(f"trainer.devices asks for {devices!r} but this machine has {n_gpus} GPU(s).")
    if "bf16" in precision and on_gpu and cuda and hw.get("bf16_supported") is False:
        names = ", ".join(g.get("name", "?") for g in hw.get("gpus", []))
        reasons.append(
            f"trainer.precision is {precision!r} but the GPU ({names}) has no bf16 support (needs compute "
            "capability >= 8.0); use 32-true or a newer GPU (never fp16 with a GradScaler on fp16 adapters)."
        )
    if precision in ("16", "16-mixed", "fp16") and not (on_gpu and cuda):
        reasons.append(f"trainer.precision is {precision!r} but this run is on CPU, where Lightning allows only bf16; "
                       "use bf16-mixed or 32-true.")
    bits = _quant_bits(cfg)
    if bits is not None:
        if pkgs.get("bitsandbytes") is None:
            reasons.append(f"The model asks for {bits}-bit quantisation but bitsandbytes is not installed: "
                           "pip install bitsandbytes.")
        elif on_gpu and cuda and hw.get("bitsandbytes_cuda") is False:
            reasons.append(f"The model asks for {bits}-bit quantisation on the GPU but bitsandbytes "
                           f"{pkgs.get('bitsandbytes')} could not load its CUDA library; run `python -m bitsandbytes`.")
    attn = _find_key(cfg.get("model", cfg), "attn_implementation")
    if str(attn).lower() in ("flash_attention_2", "flash_attention_3"):
        if not hw.get("flash_attn_importable"):
            reasons.append(f"model attn_implementation is {attn!r} but flash_attn is not installed: "
                           "pip install flash-attn, or use attn_implementation: sdpa.")
        if not cuda:
            reasons.append(f"model attn_implementation is {attn!r} but FlashAttention needs a CUDA GPU; use sdpa.")
    return reasons


def _print_summary(manifest: Mapping[str, Any], manifest_path: Path, db_path: Path) -> None:
    hw, pkgs = manifest["hardware"], manifest["packages"]
    gpus = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, sm{g['capability']})" for g in hw["gpus"]) or "none"
    rows = [
        ("python", f"{manifest['python']} ({manifest['python_executable']})"),
        ("platform", manifest["platform"]),
        ("cpu / ram", f"{hw['cpu_usable']} of {hw['cpu_count']} cores usable, {hw['ram_gib']} GiB"),
        ("torch", f"{pkgs.get('torch')} (CUDA build {hw['cuda_version']}, available: {hw['cuda_available']})"),
        ("gpus", gpus),
        ("bf16 on GPU", hw["bf16_supported"]),
        ("bitsandbytes", f"{pkgs.get('bitsandbytes')} (CUDA library: {hw['bitsandbytes_cuda']})"),
        ("flash-attn", pkgs.get("flash-attn")),
        ("transformers", pkgs.get("transformers")),
        ("peft", pkgs.get("peft")),
        ("lightning", pkgs.get("lightning")),
        ("HF token", f"present ({manifest['hf_token_source']})" if manifest["hf_token_present"] else "absent"),
        ("manifest", manifest_path),
        ("database", db_path),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def env(
    output_dir: Path = Path("output/m01_environment"),
    db_path: Path = Path("output/centralized.db"),
    check: Optional[Path] = None,
) -> int:
    """Record this machine's environment and optionally check that it can run a config.

    Writes ``<output_dir>/manifest.json`` (python, platform, package versions, CPU, RAM,
    CUDA, GPUs, bf16, bitsandbytes CUDA support, flash-attn, git commit, and whether a
    Hugging Face token is configured, never the token itself), creates or migrates the
    experiment database and adds the manifest as a row of its ``environment`` table, and
    prints a summary. Returns 0, or 1 when ``--check`` finds reasons the config cannot run.

    Args:
        output_dir: folder for manifest.json (created if missing).
        db_path: the experiment database.
        check: a fit/test YAML config; its trainer accelerator/devices/precision, model
            quantisation and attention implementation are checked against this machine.
    """
    from fteval.db import ExperimentDB

    output_dir, db_path = Path(output_dir), Path(db_path)
    manifest = collect_manifest()
    manifest["git_commit"] = git_commit()
    reasons: list[str] = []
    if check is not None:
        reasons = check_config(load_config(Path(check)), manifest)
        manifest["check"] = {"config": str(check), "ok": not reasons, "reasons": reasons}
    with ExperimentDB(db_path) as db:  # opened first: a bad database path fails before any file is written
        manifest_path = output_dir / "manifest.json"
        write_json_atomic(manifest_path, manifest, canonical=True)
        db.add_environment(manifest)
    _print_summary(manifest, manifest_path, db_path)
    if check is not None:
        if reasons:
            print(f"\n{check}: this machine cannot run it:")
            for reason in reasons:
                print(f"  - {reason}")
            return 1
        print(f"\n{check}: OK, this machine can run it.")
    return 0
