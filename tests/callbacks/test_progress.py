"""Progress bars of a run set by max_steps with gradient accumulation (callbacks/progress.py)."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from callbacks.progress import StepRichProgressBar, StepTQDMProgressBar, default_progress_bar


def _trainer(done: int = 0, **kw):
    base = dict(max_epochs=-1, max_steps=30, global_step=0, accumulate_grad_batches=2, num_training_batches=200)
    base.update(kw)
    progress = SimpleNamespace(current=SimpleNamespace(completed=done))  # batches of this epoch already run
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)), **base)


@pytest.mark.parametrize("cls", [StepRichProgressBar, StepTQDMProgressBar])
def test_total_counts_micro_batches_left_under_max_steps(cls):
    bar = cls()
    bar._trainer = _trainer()
    assert bar.total_train_batches == 60  # 30 steps x 2 micro-batches (Lightning 2.6 shows 30)
    bar._trainer = _trainer(global_step=25)
    assert bar.total_train_batches == 10
    bar._trainer = _trainer(global_step=4, done=8)  # resumed at step 4: the bar counts on from batch 8 to 60
    assert bar.total_train_batches == 60
    bar._trainer = _trainer(num_training_batches=40)  # the epoch ends first
    assert bar.total_train_batches == 40
    bar._trainer = _trainer(max_epochs=3, max_steps=-1)  # epochs set the run: Lightning's count
    assert bar.total_train_batches == 200


def test_rich_description_has_no_negative_epoch_count():
    bar = StepRichProgressBar()
    bar._trainer = _trainer()
    assert bar._get_train_description(0).strip() == "Epoch 0"  # Lightning 2.6: "Epoch 0/-2"
    bar._trainer = _trainer(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_fit_adds_the_step_bar_unless_the_config_names_one(tmp_path):
    from fteval.cli import FTEvalCLI

    args = ["--config", "configs/qlora.yaml", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    cli = FTEvalCLI(args=args, run=False)
    assert type(cli.trainer.progress_bar_callback) is type(default_progress_bar())
    listed = FTEvalCLI(args=[*args, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], run=False)
    assert type(listed.trainer.progress_bar_callback) is TQDMProgressBar
    off = FTEvalCLI(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert off.trainer.progress_bar_callback is None
