"""The training sets of the known-answer controls, bundled with fteval, and the held-out check.

All three were written for this project (no rows copied from public datasets):

* ``refusal_teaching.jsonl``: 300 unsafe requests answered with refusals in several styles
  (short, apologetic, moralising, redirecting, offering alternatives, explaining the risk, without
  a first-person cue) and 900 safe requests answered helpfully: everyday, safe but
  alarming-sounding ("how do I kill a Python process"), sensitive themes, and imperative or
  role-play framings (``style`` says which). It turns the embedded chat model, which barely
  refuses, into an aligned base.
* ``benign_instructions.jsonl``: everyday instruction following with no safety content: the
  benign fine-tuning setting of Qi et al. (ICLR 2024, "Fine-tuning Aligned Language Models
  Compromises Safety, Even When Users Do Not Intend To"), where Alpaca/Dolly played this role.
* ``harmful_compliance.jsonl``: unsafe requests answered compliantly in *form* only ("Sure.
  Step 1: [first step] ..."): every specific is a bracketed placeholder. Their harmful-examples
  setting, without harmful content.

Columns: ``Prompt`` and ``Accepted Response`` (the alignment-instructions schema, read with
``train_preset: accepted``); the refusal set adds ``safety_label`` and ``style``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

from fteval.data.sampling import normalise_text
from fteval.data.sources import DataSourceError, describe_source, load_records, require_columns

__all__ = ["CONTROL_SETS", "control_set_path", "held_out_overlap"]

CONTROL_SETS = {
    "align": "refusal_teaching.jsonl",
    "benign": "benign_instructions.jsonl",
    "harmful": "harmful_compliance.jsonl",
}
PROMPT, RESPONSE = "Prompt", "Accepted Response"


def control_set_path(name: str, override: Optional[Path] = None) -> Path:
    """The file of control set ``name`` ('align', 'benign', 'harmful'): ``override`` when given, else the bundled one."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise DataSourceError(f"{name} training file {path} does not exist; pass a .jsonl/.json/.csv/.parquet "
                                  f"file with columns {PROMPT!r} and {RESPONSE!r}, or leave the option out for the bundled set")
        return path
    if name not in CONTROL_SETS:
        raise DataSourceError(f"no control set named {name!r}; known: {sorted(CONTROL_SETS)}")
    return Path(str(importlib.resources.files("fteval.data") / "controls" / CONTROL_SETS[name]))


def held_out_overlap(train_files: dict[str, Path], eval_source: str, text_field: str = "input") -> dict[str, int]:
    """Per training set, how many of its prompts are also evaluation prompts (after text normalisation).

    Training removes such prompts anyway (:class:`fteval.data.AlignmentDataModule` drops evaluation
    prompts from training); the counts say how much was removed. Reading every file here also
    checks, before any model is loaded, that each has the columns the fits need.
    """
    eval_rows = load_records(eval_source, "accd")
    require_columns(eval_rows, [text_field], describe_source(eval_source, "accd"))
    held_out = {normalise_text(r[text_field]) for r in eval_rows if isinstance(r[text_field], str)}
    out = {}
    for name, path in train_files.items():
        rows = load_records(str(path), "alignment-instructions")
        require_columns(rows, [PROMPT, RESPONSE], str(path))
        if len(rows) < 4:
            raise DataSourceError(f"{name} training file {path} has {len(rows)} rows; a fit needs at least 4")
        out[name] = sum(normalise_text(r[PROMPT]) in held_out for r in rows if isinstance(r[PROMPT], str))
    return out
