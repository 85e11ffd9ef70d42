"""GRIT from a plain torch loop: :class:`fteval.grit.GRITOptimizer` gives bitwise the parameters that
``GRITModule`` reaches under Lightning, on the embedded model, with every part of GRIT active
(statistics, penalties, clipping, preconditioning, reprojection) and gradient accumulation."""

import lightning as L
import torch

from callbacks.kfac import KFACPreconditioner
from callbacks.regularisers import GeometryRegulariser
from callbacks.reprojection import NeuralReprojection
from fteval.grit import KFAC, GeometryPenalties, GRITOptimizer, Reprojection
from fteval.models import GRITModule
from tests.models.test_qlora import adamw, datamodule, trainer

KW = dict(quantization="none", r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), optimizer=adamw(1e-3),
          lr_schedule="constant", warmup_steps=0)
KFAC_SETTINGS = dict(update_freq=1, min_samples=8, clip_grad_norm=0.5)
PENALTY_SETTINGS = dict(curvature_weight=1e-2, reprojection_weight=1e-2)  # large enough to change the result
REPROJECTION_SETTINGS = dict(every_n_steps=2, top_k=2, min_samples=8)
STEPS, ACCUMULATE = 4, 2


def adapter(module: GRITModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}


def test_plain_torch_loop_equals_lightning_fit(tmp_path):
    L.seed_everything(0)
    lightning_module = GRITModule(**KW, export_dir=str(tmp_path / "adapter"))
    seen: dict = {"batches": []}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["start"] = adapter(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["batches"].append({k: v.clone() for k, v in batch.items()})

    callbacks = [KFACPreconditioner(**KFAC_SETTINGS), GeometryRegulariser(**PENALTY_SETTINGS),
                 NeuralReprojection(**REPROJECTION_SETTINGS), Record()]
    trainer(tmp_path, max_steps=STEPS, callbacks=callbacks, limit_val_batches=0,
            accumulate_grad_batches=ACCUMULATE).fit(lightning_module, datamodule(tmp_path))
    assert len(seen["batches"]) == STEPS * ACCUMULATE
    assert isinstance(lightning_module.trainer.optimizers[0], GRITOptimizer)

    # the same model and start, then GRIT from plain torch: no Trainer, no callbacks
    plain = GRITModule(**KW)
    plain.configure_model()
    plain.model.load_state_dict(seen["start"], strict=False)
    parts = [KFAC(**KFAC_SETTINGS), GeometryPenalties(**PENALTY_SETTINGS), Reprojection(**REPROJECTION_SETTINGS)]
    optimizer = GRITOptimizer.from_parts(plain.optimizer_factory(plain.trainable_parameters()), parts, plain.model)
    plain.model.train()
    reprojected = 0
    for i, batch in enumerate(seen["batches"]):
        optimizer.begin_micro_batch(batch)
        loss = plain.model(input_ids=batch["input_ids"], labels=batch["labels"],
                           attention_mask=batch["attention_mask"]).loss
        (loss / ACCUMULATE).backward()
        if (i + 1) % ACCUMULATE == 0:
            optimizer.step()
            optimizer.zero_grad()
            reprojected += int(optimizer.metrics.get("grit/reprojected_layers", 0))

    assert reprojected == 2 * 60  # steps 2 and 4, every layer
    got, expected = adapter(plain), adapter(lightning_module)
    assert got.keys() == expected.keys() and len(got) == 120
    assert all(torch.equal(got[n], expected[n]) for n in got)  # bitwise
    assert any(not torch.equal(seen["start"][n], expected[n]) for n in got)  # and training moved them
