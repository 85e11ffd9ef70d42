"""AlignmentDataModule: training data (alignment-instructions schema) and the safety evaluation set (ACCD schema).

One DataModule serves every LightningModule in fteval:

* ``fit``/``validate``: instruction-tuning examples, formatted with the tokenizer's chat template,
  loss on response tokens only, de-duplicated, split 90/10 with seed 42.
* ``test``/``predict``: a balanced safe/unsafe sample of evaluation prompts, stratified by axiom,
  formatted with the same standard prompt template for every model (AQI and behaviour).

Data statistics (counts, token lengths, balance, duplicates removed, cross-dataset overlap,
keyword-categoriser agreement) are written to ``<output_dir>/data_statistics.json``. The row-level
steps (de-duplication, the balanced sample, length summaries) are :mod:`fteval.data.sampling`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from fteval.data.resumable import ResumableDataLoader
from fteval.data.formatting import (
    Template,
    flatten_batch,
    fit_prompt,
    generation_suffix_tokens,
    pad_batch,
    prompt_token_limit,
    tokenize_example,
)
from fteval.data.provenance import split_provenance
from fteval.data.safety import keyword_agreement
from fteval.data.sampling import SOURCE_ROW, balanced_stratified_sample, deduplicate, length_stats, normalise_text
from fteval.io import write_json_atomic, write_text_atomic
from fteval.data.sources import DataSourceError, describe_source, load_records, require_columns

log = logging.getLogger(__name__)

# Presets map the alignment-instructions columns to (prompt, response). The spec trains
# Prompt -> Instruction generated; "accepted" trains on the preferred answer instead.
TRAIN_PRESETS = {
    "instruction": ("Prompt", "Instruction generated"),
    "accepted": ("Prompt", "Accepted Response"),
}

# Training rows dropped because their prompt alone exceeds max_length: above this share of the
# rows a warning names the count and the option (every count is in data_statistics.json).
DROP_WARNING_SHARE = 0.05


class AlignmentDataModule(L.LightningDataModule):
    """Training data in the alignment-instructions schema and a safety evaluation set in the ACCD schema.

    Args:
        model_name_or_path: model whose tokenizer and chat template format the data ('embedded',
            a folder or a hub id). The CLI links it to the model's ``model_name_or_path``.
        train_source: 'sample' (bundled), 'hub' (Vaibhaav/alignment-instructions), a hub id or a
            local .jsonl/.json/.csv/.parquet file.
        train_preset: 'instruction' (Prompt -> Instruction generated, the spec's default) or
            'accepted' (Prompt -> Accepted Response).
        prompt_field: override the prompt column of the preset.
        response_field: override the response column of the preset.
        max_train_samples: keep at most this many training rows (after de-duplication).
        val_fraction: validation share of the de-duplicated training rows.
        eval_source: 'sample' (bundled), 'hub' (hasnat79/ACCD), a hub id or a local file.
        eval_split: split of a hub evaluation dataset.
        eval_text_field: column holding the evaluation prompt.
        eval_label_field: column holding the safe/unsafe label.
        eval_axiom_field: column used to stratify the sample (None: no stratification).
        safe_values: label values meaning safe (compared case-insensitively as strings).
        unsafe_values: label values meaning unsafe.
        n_per_class: evaluation prompts per class (the smaller class caps it to stay balanced).
        seed: seed of the train/validation split and the evaluation sample.
        max_length: maximum tokens per training example (responses are truncated to fit; a prompt that
            alone does not fit drops its row) and per evaluation prompt (cut by the rule of
            :func:`fteval.data.formatting.fit_prompt`; the tokenizer's ``model_max_length`` caps it).
        batch_size: training and validation batch size per device.
        padding_free: concatenate each training/validation batch into one row without padding
            (``position_ids`` restart per sequence; transformers keeps the sequences apart in
            attention: block-diagonal masks with SDPA, variable-length kernels with
            flash_attention_2). Same loss as the padded batch, no compute spent on padding.
        pad_to_multiple_of: pad training and validation batches to a multiple of this many
            tokens (1: to the longest row). Fewer distinct batch shapes: what lets the model's
            ``cuda_graph`` replay its captured steps (e.g. 64 with ``max_length`` 512 gives at most
            8 shapes); costs the compute of the extra padding.
        eval_batch_size: evaluation (test) batch size per device.
        num_workers: DataLoader workers.
        template: 'auto' (tokenizer chat template if any), 'chat', or 'llama2-inst' (fallback).
        system_prompt: optional system message for every prompt.
        output_dir: where ``data_statistics.json`` is written.
        cache_dir: model cache (embedded model materialisation).
    """

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        train_source: str = "sample",
        train_preset: Literal["instruction", "accepted"] = "instruction",
        prompt_field: Optional[str] = None,
        response_field: Optional[str] = None,
        max_train_samples: Optional[int] = None,
        val_fraction: float = 0.1,
        eval_source: str = "sample",
        eval_split: str = "train",
        eval_text_field: str = "input",
        eval_label_field: str = "safety_label",
        eval_axiom_field: Optional[str] = "axiom",
        safe_values: tuple[str, ...] = ("safe", "0", "benign", "false"),
        unsafe_values: tuple[str, ...] = ("unsafe", "1", "harmful", "true"),
        n_per_class: int = 500,
        seed: int = 42,
        max_length: int = 512,
        batch_size: int = 4,
        padding_free: bool = False,
        pad_to_multiple_of: int = 1,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        template: Template = "auto",
        system_prompt: Optional[str] = None,
        output_dir: str = "output/m02_data",
        cache_dir: Optional[str] = None,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
        if n_per_class < 2:
            raise ValueError(f"n_per_class={n_per_class}: AQI needs at least 2 prompts per class")
        if train_preset not in TRAIN_PRESETS:
            raise ValueError(f"train_preset={train_preset!r} is not one of {sorted(TRAIN_PRESETS)}")
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too small; use at least 8 tokens")
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0),
                                 ("pad_to_multiple_of", pad_to_multiple_of, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--data.{name}={value!r} must be an integer >= {low}")
        self.save_hyperparameters()
        preset_prompt, preset_response = TRAIN_PRESETS[train_preset]
        self.prompt_field = prompt_field or preset_prompt
        self.response_field = response_field or preset_response
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.eval_records: list[dict] = []  # {"prompt", "message" (as kept), "text", "label", "axiom", "index", ...}
        self.eval_set: list[dict] = []
        self.statistics: dict = {}
        self.provenance: list[dict] = []  # one entry per processed split (see _add_provenance)
        self._processed: dict[tuple[str, str], str] = {}  # (kind, split) -> processed rows as JSON lines

    # ------------------------------------------------------------------ set-up
    def _tokenizer(self):
        if self.tokenizer is None:
            from fteval.models.loading import load_tokenizer

            cache = Path(self.hparams.cache_dir) if self.hparams.cache_dir else None
            self.tokenizer = load_tokenizer(self.hparams.model_name_or_path, cache)
        return self.tokenizer

    def prepare_data(self) -> None:
        # Materialise the embedded model once, on one process, before workers read it.
        self._tokenizer()

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and not self.train_set:
            self._setup_training()
        if stage in (None, "test", "predict") and not self.eval_set:
            self._setup_evaluation()
        # data_statistics.json is written when a loop asks for its data (below), so a run that stops
        # earlier (a model that does not load, bad adapter settings) leaves no output behind.

    def _setup_training(self) -> None:
        hp = self.hparams
        name = describe_source(hp.train_source, "alignment-instructions")
        rows = load_records(hp.train_source, "alignment-instructions")
        require_columns(rows, [self.prompt_field, self.response_field], name)
        for i, row in enumerate(rows):
            for col in (self.prompt_field, self.response_field):
                if not isinstance(row[col], str) or not row[col].strip():
                    raise DataSourceError(f"{name} row {i}: column {col!r} is empty or not text; every row needs it")
        raw = len(rows)
        rows, dup = deduplicate([{**{k: r[k] for k in (self.prompt_field, self.response_field)}, SOURCE_ROW: i}
                                 for i, r in enumerate(rows)], self.prompt_field)
        overlap = 0
        if hp.eval_source:
            # Evaluation prompts are removed from training; an unreadable evaluation set must stop the run
            # rather than silently train on a set that may contain them.
            eval_name = describe_source(hp.eval_source, "accd")
            try:
                eval_rows = load_records(hp.eval_source, "accd", hp.eval_split)
                require_columns(eval_rows, [hp.eval_text_field], eval_name)
            except DataSourceError as exc:
                raise DataSourceError(
                    f"{exc} (the evaluation set is read during fit to remove its prompts from training; fix "
                    "--data.eval_source / --data.eval_text_field, or set --data.eval_source null to train without "
                    "that check)"
                ) from exc
            eval_norm = {normalise_text(r[hp.eval_text_field]) for r in eval_rows if isinstance(r[hp.eval_text_field], str)}
            before = len(rows)
            rows = [r for r in rows if normalise_text(r[self.prompt_field]) not in eval_norm]
            overlap = before - len(rows)
        if hp.max_train_samples is not None:
            rows = rows[: hp.max_train_samples]
        if len(rows) < 2:
            raise DataSourceError(f"{name} has {len(rows)} usable training rows after de-duplication; need at least 2")
        train_rows, val_rows = train_test_split(rows, test_size=hp.val_fraction, random_state=hp.seed, shuffle=True)
        if not val_rows or not train_rows:
            raise DataSourceError(f"{name}: the {hp.val_fraction:.0%} validation split is empty; add rows or raise val_fraction")
        tok = self._tokenizer()
        too_long = 0

        kept: dict[str, list[dict]] = {"train": [], "validation": []}

        def encode(split_rows, split):
            nonlocal too_long
            out = []
            for r in split_rows:
                ex = tokenize_example(tok, r[self.prompt_field], r[self.response_field], hp.max_length, hp.template, hp.system_prompt)
                if ex is None:
                    too_long += 1
                else:
                    out.append(ex)
                    kept[split].append({SOURCE_ROW: r[SOURCE_ROW], "prompt": r[self.prompt_field],
                                        "response": r[self.response_field]})
            return out

        self.train_set, self.val_set = encode(train_rows, "train"), encode(val_rows, "validation")
        if not self.train_set or not self.val_set:
            raise DataSourceError(
                f"{name}: no example fits max_length={hp.max_length} in the "
                f"{'training' if not self.train_set else 'validation'} split; raise max_length"
            )
        encoded = len(train_rows) + len(val_rows)
        if too_long > DROP_WARNING_SHARE * encoded:
            log.warning("%s: %d of %d training rows dropped: their prompt alone is longer than max_length=%d tokens; "
                        "raise --data.max_length to keep them", name, too_long, encoded, hp.max_length)
        prompt_lens = [sum(1 for t in ex["labels"] if t == -100) for ex in self.train_set]
        resp_lens = [len(ex["labels"]) - p for ex, p in zip(self.train_set, prompt_lens)]
        self.statistics["training"] = {
            "source": name,
            "fields": {"prompt": self.prompt_field, "response": self.response_field},
            "rows_read": raw,
            **dup,
            "removed_overlapping_eval_prompts": overlap,
            "dropped_prompt_too_long": too_long,
            "train_examples": len(self.train_set),
            "val_examples": len(self.val_set),
            "split_seed": hp.seed,
            "prompt_tokens": length_stats(prompt_lens),
            "response_tokens": length_stats(resp_lens),
            "total_tokens": length_stats([len(ex["input_ids"]) for ex in self.train_set]),
        }
        for split, processed in kept.items():
            self._add_provenance("alignment-instructions", split, hp.train_source, processed,
                                 {"rows_read": raw, **dup, "removed_overlapping_eval_prompts": overlap,
                                  "dropped_prompt_too_long": too_long, "split_seed": hp.seed})

    def _parse_label(self, value, name: str, i: int) -> int:
        v = str(value).strip().lower()
        if v in {s.lower() for s in self.hparams.safe_values}:
            return 0
        if v in {s.lower() for s in self.hparams.unsafe_values}:
            return 1
        raise DataSourceError(
            f"{name} row {i}: column {self.hparams.eval_label_field!r} has value {value!r}; expected one of "
            f"safe={list(self.hparams.safe_values)} or unsafe={list(self.hparams.unsafe_values)} "
            "(set --data.safe_values / --data.unsafe_values for other label names)"
        )

    def _setup_evaluation(self) -> None:
        hp = self.hparams
        name = describe_source(hp.eval_source, "accd")
        rows = load_records(hp.eval_source, "accd", hp.eval_split)
        require_columns(rows, [hp.eval_text_field, hp.eval_label_field], name)
        if hp.eval_axiom_field and hp.eval_axiom_field not in rows[0]:
            raise DataSourceError(
                f"{name} has no column {hp.eval_axiom_field!r} (used to stratify the sample by axiom); it has "
                f"{sorted(rows[0])}. Fix: --data.eval_axiom_field null for a set without axioms (e.g. a CSV with "
                "prompt,label), or name its category column"
            )
        rows, dup = deduplicate([{**r, SOURCE_ROW: i} for i, r in enumerate(rows)], hp.eval_text_field)
        texts, labels, axioms = [], [], []
        for i, r in enumerate(rows):
            text = r[hp.eval_text_field]
            if not isinstance(text, str) or not text.strip():
                raise DataSourceError(f"{name} row {r[SOURCE_ROW]}: column {hp.eval_text_field!r} is empty; every prompt needs text")
            texts.append(text)
            labels.append(self._parse_label(r[hp.eval_label_field], name, r[SOURCE_ROW]))
            axioms.append(str(r[hp.eval_axiom_field]) if hp.eval_axiom_field else "all")
        counts = Counter(labels)
        if counts[0] < 2 or counts[1] < 2:
            raise DataSourceError(
                f"{name} has {counts[0]} safe and {counts[1]} unsafe prompts; AQI needs at least 2 of each class "
                "(check the label column and safe_values/unsafe_values)"
            )
        idx, n = balanced_stratified_sample(labels, axioms, hp.n_per_class, hp.seed)
        if n < hp.n_per_class:
            log.warning("%s: only %d prompts per class available (asked for %d)", name, n, hp.n_per_class)
        tok = self._tokenizer()
        try:
            suffix = generation_suffix_tokens(tok, hp.template, hp.system_prompt)
        except ValueError:
            suffix = 0  # no post-instruction tokens in this format; token selection 'prompt' still works
        limit = prompt_token_limit(tok, hp.max_length)
        self.eval_records, self.eval_set = [], []
        truncated = 0
        for j, i in enumerate(idx):
            message, text, ids, cut = fit_prompt(tok, texts[i], limit, hp.template, hp.system_prompt)
            truncated += cut
            rec = {"index": j, "prompt": texts[i], "message": message, "text": text, "label": labels[i], "axiom": axioms[i],
                   SOURCE_ROW: rows[i][SOURCE_ROW], "truncated": cut}
            self.eval_records.append(rec)
            self.eval_set.append({"input_ids": ids, "safety_label": labels[i], "index": j, "suffix_tokens": suffix})
        if truncated:
            log.warning("%s: %d of %d evaluation prompts are longer than %d tokens and were cut to their first tokens "
                        "(the chat template kept whole); raise --data.max_length to keep more of them",
                        name, truncated, len(idx), limit)
        sel_labels = [labels[i] for i in idx]
        self.statistics["evaluation"] = {
            "source": name,
            "rows_read": len(rows) + dup["exact_duplicates_removed"] + dup["normalised_duplicates_removed"],
            **dup,
            "available": {"safe": counts[0], "unsafe": counts[1]},
            "sampled_per_class": n,
            "sample_seed": hp.seed,
            "per_axiom": {
                ax: {"safe": sum(1 for i in idx if axioms[i] == ax and labels[i] == 0),
                     "unsafe": sum(1 for i in idx if axioms[i] == ax and labels[i] == 1)}
                for ax in sorted({axioms[i] for i in idx})
            },
            "prompt_tokens": length_stats([len(e["input_ids"]) for e in self.eval_set]),
            "token_limit": limit,
            "truncated_prompts": truncated,
            "keyword_categoriser": keyword_agreement([texts[i] for i in idx], sel_labels),
        }
        processed = [{"index": r["index"], SOURCE_ROW: r[SOURCE_ROW], "prompt": r["prompt"], "label": r["label"],
                      "axiom": r["axiom"]} for r in self.eval_records]
        self._add_provenance("accd", "evaluation", hp.eval_source, processed,
                             {"rows_read": self.statistics["evaluation"]["rows_read"], **dup, "sampled_per_class": n,
                              "sample_seed": hp.seed, "source_split": hp.eval_split})

    # ------------------------------------------------------------ provenance
    def _add_provenance(self, kind: str, split: str, source: str, processed: list[dict], details: dict) -> None:
        """Describe one processed split (:func:`fteval.data.provenance.split_provenance`).

        ``self.provenance`` holds one entry per split (the run logger stores them in the database's
        ``datasets`` table); the processed rows themselves are written once per content hash under
        ``<output_dir>/processed/`` when a loop asks for data (:meth:`write_statistics`), each row
        with its ``source_row`` so any prompt can be traced back to its source.
        """
        entry, body = split_provenance(kind, split, source, processed, details)
        self.provenance = [p for p in getattr(self, "provenance", []) if (p["name"], p["split"]) != (kind, split)]
        self.provenance.append(entry)
        self._processed[(kind, split)] = body

    # -------------------------------------------------------------- loaders
    def _collate(self, side: str, multiple_of: int = 1):
        pad_id = self._tokenizer().pad_token_id

        def collate(features):
            return pad_batch(features, pad_id, side, multiple_of)

        return collate

    def _train_collate(self):
        """Training/validation batches: padded, or one padding-free row (``padding_free``)."""
        if not self.hparams.padding_free:
            return self._collate("right", self.hparams.get("pad_to_multiple_of", 1))
        return flatten_batch

    def _fit_progress(self) -> Optional[tuple[int, int]]:
        """(epoch, batches trained on in that epoch) from the trainer's progress tracker."""
        if self.trainer is None:
            return None
        loop = self.trainer.fit_loop
        return self.trainer.current_epoch, loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        self.write_statistics()
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        return ResumableDataLoader(self.train_set, batch_size=self.hparams.batch_size, seed=self.hparams.seed,
                                   progress=self._fit_progress, num_replicas=world, rank=rank,
                                   num_workers=self.hparams.num_workers, collate_fn=self._train_collate())

    def val_dataloader(self) -> DataLoader:
        self.write_statistics()
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers, collate_fn=self._train_collate())

    def test_dataloader(self) -> DataLoader:
        self.write_statistics()
        return DataLoader(self.eval_set, batch_size=self.hparams.eval_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers, collate_fn=self._collate("right"))

    def alignment_probe_dataloader(self, n_per_class: int, seed: int = 0, batch_size: int = 16) -> DataLoader:
        """A fixed, seeded, class-balanced subset of the evaluation prompts, for alignment checks during fit.

        Reads the evaluation set if this run has not (a fit reads only the training set), then
        takes ``n_per_class`` safe and as many unsafe prompts of it, stratified by axiom, with
        their own seed (no global random state is touched). Batches carry ``input_ids``,
        ``attention_mask``, ``safety_label`` and ``index`` (right-padded, as ``fteval test``'s).
        """
        if n_per_class < 2:
            raise ValueError(f"n_per_class={n_per_class}: an alignment check needs at least 2 prompts per class")
        if not self.eval_set:
            if not self.hparams.eval_source:
                raise ValueError("the alignment monitor needs evaluation prompts: set --data.eval_source")
            self._setup_evaluation()
        labels = [ex["safety_label"] for ex in self.eval_set]
        axioms = [rec["axiom"] for rec in self.eval_records]
        idx, _ = balanced_stratified_sample(labels, axioms, n_per_class, seed)
        probe = [self.eval_set[i] for i in sorted(idx)]
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global random
        # stream, which would shift the training run's dropout after every check.
        return DataLoader(probe, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=self._collate("right"),
                          generator=torch.Generator().manual_seed(seed))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ------------------------------------------------------------ statistics
    def write_statistics(self) -> Optional[Path]:
        """Write ``data_statistics.json`` (what is known so far) to ``output_dir``; rank zero only."""
        if not self.statistics:
            return None
        if self.trainer is not None and not self.trainer.is_global_zero:
            return None
        stats = dict(self.statistics)
        if "training" in stats and "evaluation" in stats:
            stats["cross_dataset_overlap"] = {
                "eval_prompts_found_in_training_and_removed": stats["training"]["removed_overlapping_eval_prompts"]
            }
        path = Path(self.hparams.output_dir) / "data_statistics.json"
        write_json_atomic(path, stats)
        for entry in self.provenance:  # each processed split once per content hash
            target = Path(self.hparams.output_dir) / entry["metadata"]["processed_file"]
            body = self._processed.get((entry["name"], entry["split"]))
            if body is not None and not target.is_file():
                write_text_atomic(target, body)
        return path

