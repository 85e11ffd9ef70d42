"""``fteval data-stats``: build the data module of a config and write its statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from fteval.data.datamodule import AlignmentDataModule


def data_stats(from_config: Optional[Path] = None, output_dir: Optional[str] = None, n_per_class: Optional[int] = None) -> int:
    """Prepare training and evaluation data and write data_statistics.json (counts, lengths, duplicates, balance).

    Args:
        from_config: a fit/test YAML (its ``data`` section and the model's ``model_name_or_path`` are used);
            default: the embedded model with the bundled samples.
        output_dir: override the statistics folder (default: the config's, or output/m02_data).
        n_per_class: override the evaluation prompts per class.
    """
    kwargs: dict = {}
    if from_config is not None:
        path = Path(from_config)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist; pass a YAML such as configs/qlora.yaml")
        doc = yaml.safe_load(path.read_text()) or {}
        data = doc.get("data") or {}
        kwargs.update(data.get("init_args", data) if isinstance(data, dict) else {})
        model_args = ((doc.get("model") or {}).get("init_args") or {})
        for key in ("model_name_or_path", "cache_dir"):
            if key in model_args:
                kwargs[key] = model_args[key]
    if output_dir is not None:
        kwargs["output_dir"] = output_dir
    if n_per_class is not None:
        kwargs["n_per_class"] = n_per_class
    dm = AlignmentDataModule(**kwargs)
    dm.prepare_data()
    dm.setup(None)
    out = dm.write_statistics()
    tr, ev = dm.statistics["training"], dm.statistics["evaluation"]
    print(f"training   : {tr['train_examples']} train / {tr['val_examples']} val examples from {tr['source']} "
          f"({tr['exact_duplicates_removed']} exact + {tr['normalised_duplicates_removed']} near duplicates removed)")
    print(f"evaluation : {ev['sampled_per_class']} safe + {ev['sampled_per_class']} unsafe prompts from {ev['source']}")
    kc = ev["keyword_categoriser"]
    print(f"keywords   : accuracy {kc['accuracy']:.3f}, Cohen's kappa {kc['cohen_kappa']:.3f} vs dataset labels")
    print(f"written    : {out}")
    return 0
