"""ExperimentDBLogger on a tiny Lightning model: experiment rows, per-step metrics, resume, failure."""

from __future__ import annotations

import types
import uuid

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.run_logger import ExperimentDBLogger
from fteval.db import ExperimentDB


class TinyModule(L.LightningModule):
    """Two linear layers on random regression data; remembers the loss of every batch."""

    method_name = "qlora"

    def __init__(self, lr: float = 0.05, fail_at_step: int = -1, hf_token: str = "", decay: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.experiment_id = None
        self.artifact_paths: dict[str, str] = {}
        self.batch_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.global_step == self.hparams.fail_at_step:
            raise RuntimeError("synthetic failure in training_step")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.batch_losses.append(loss.item())
        self.log("train/mse", loss, on_step=True, on_epoch=False)
        return {"loss": loss, "grad_free": torch.tensor(7.0)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.decay:
            return opt
        # lr of optimizer step k (1-based) = lr / k
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 1.0 / (done + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 32, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def trainer(cb: ExperimentDBLogger, tmp_path, **kw) -> L.Trainer:
    args = dict(max_steps=3, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", limit_val_batches=2, num_sanity_val_steps=0,
                default_root_dir=tmp_path)
    return L.Trainer(callbacks=[cb], **{**args, **kw})


def values(db: ExperimentDB, exp: int, name: str) -> list[tuple[int, float]]:
    return [(m["step"], m["value"]) for m in db.metrics(exp, name=name)]


def test_fit_writes_experiment_metrics_and_artifacts(tmp_path):
    torch.manual_seed(0)
    artifact = tmp_path / "adapter.bin"
    artifact.write_bytes(b"weights" * 10)
    model = TinyModule()
    model.artifact_paths = {"adapter": str(artifact)}
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db", experiment_name="tiny")
    trainer(cb, tmp_path, val_check_interval=3).fit(model, loader(), loader(8))

    assert cb.experiment_id is not None and model.experiment_id == cb.experiment_id
    with ExperimentDB(tmp_path / "c.db") as db:
        exp = db.experiment(cb.experiment_id)
        assert (exp["name"], exp["method"], exp["stage"], exp["status"]) == ("tiny", "qlora", "fit", "finished")
        assert exp["config"]["hparams"]["lr"] == 0.05
        assert exp["config"]["trainer"]["max_steps"] == 3
        assert exp["packages"]["torch"] == torch.__version__ and "cpu_count" in exp["hardware"]
        assert exp["finished_at"] >= exp["started_at"]
        loss = values(db, exp["id"], "loss")
        assert [s for s, _ in loss] == [1, 2, 3]
        assert [v for _, v in loss] == pytest.approx(model.batch_losses, rel=1e-6)
        assert [v for _, v in values(db, exp["id"], "train/mse")] == pytest.approx(model.batch_losses, rel=1e-6)
        assert values(db, exp["id"], "grad_free") == [(1, 7.0), (2, 7.0), (3, 7.0)]
        assert values(db, exp["id"], "lr") == [(1, 0.05), (2, 0.05), (3, 0.05)]
        assert all(v > 0 for _, v in values(db, exp["id"], "time/step_s"))
        assert [s for s, _ in values(db, exp["id"], "val/loss")] == [3]
        (fit_s,) = values(db, exp["id"], "time/fit_s")
        assert fit_s[0] == 3 and fit_s[1] > 0
        assert {r["method"] for r in db.rows("training_metrics")} == {"qlora"}  # under the module's method_name
        (art,) = db.artifacts(exp["id"])
        assert (art["kind"], art["size_bytes"]) == ("adapter", 70)


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    torch.manual_seed(0)
    model = TinyModule(decay=True)
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    trainer(cb, tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0).fit(model, loader())
    assert len(model.batch_losses) == 6
    expected = [sum(model.batch_losses[i:i + 2]) / 2 for i in (0, 2, 4)]
    with ExperimentDB(tmp_path / "c.db") as db:
        loss = values(db, cb.experiment_id, "loss")
        lr = values(db, cb.experiment_id, "lr")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx(expected, rel=1e-6)
    assert lr == [(1, pytest.approx(0.05)), (2, pytest.approx(0.025)), (3, pytest.approx(0.05 / 3))]


class GradNormModule(TinyModule):
    """Logs the gradient norm the optimizer is about to use, as fteval's adapter modules do."""

    def __init__(self) -> None:
        super().__init__(decay=True)
        self.step_norms: list[float] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()]))
        self.step_norms.append(float(norm))
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)


def test_grad_norm_under_accumulation_is_the_steps_own_value(tmp_path):
    """Each step's train/grad_norm is that step's norm, as Lightning's logger (TensorBoard, CSV) writes it."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = GradNormModule()
    cb = ExperimentDBLogger(db_path=tmp_path / "g.db")
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(cb, tmp_path, max_steps=4, accumulate_grad_batches=3, limit_val_batches=0, logger=logger,
            log_every_n_steps=1).fit(model, loader())
    with ExperimentDB(tmp_path / "g.db") as db:
        recorded = values(db, cb.experiment_id, "train/grad_norm")
    assert len(set(model.step_norms)) == 4  # four different norms: a mix of two steps would show
    assert recorded == [(s + 1, pytest.approx(v, rel=1e-6)) for s, v in enumerate(model.step_norms)]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        written = [(int(r["step"]) + 1, float(r["train/grad_norm"])) for r in csv.DictReader(fh) if r["train/grad_norm"]]
    assert written == [(s, pytest.approx(v, rel=1e-6)) for s, v in recorded]


@pytest.mark.parametrize("every, flushes", [(1, 4), (2, 2), (5, 1)])
def test_flush_every_n_steps_uses_one_transaction_per_flush(tmp_path, monkeypatch, every, flushes):
    calls = []
    original = ExperimentDB.log_training_metrics

    def spy(self, experiment_id, method, rows):
        calls.append(sorted({r[0] for r in rows}))
        return original(self, experiment_id, method, rows)

    monkeypatch.setattr(ExperimentDB, "log_training_metrics", spy)
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db", log_every_n_steps=every)
    trainer(cb, tmp_path, limit_val_batches=0).fit(TinyModule(), loader())
    assert len(calls) == flushes
    assert sorted({s for c in calls for s in c}) == [1, 2, 3]
    with pytest.raises(ValueError, match="log_every_n_steps"):
        ExperimentDBLogger(log_every_n_steps=0)


def test_resume_keeps_experiment_and_replaces_rows_after_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    db_path, ckpt = tmp_path / "c.db", tmp_path / "step2.ckpt"
    cb = ExperimentDBLogger(db_path=db_path)
    t = trainer(cb, tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(TinyModule(), loader())
    t.save_checkpoint(ckpt)
    first = cb.experiment_id
    with ExperimentDB(db_path) as db:  # rows an interrupted run logged after its last checkpoint
        db.log_training_metrics(first, "qlora", [(3, "loss", 999.0), (4, "loss", 999.0)])

    model = TinyModule()
    cb2 = ExperimentDBLogger(db_path=db_path)
    trainer(cb2, tmp_path, max_steps=4, limit_val_batches=0).fit(model, loader(), ckpt_path=ckpt)
    assert cb2.experiment_id == first == model.experiment_id
    with ExperimentDB(db_path) as db:
        assert len(db.experiments()) == 1 and db.experiment(first)["status"] == "finished"
        loss = values(db, first, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss[2:]] == pytest.approx(model.batch_losses, rel=1e-6)


def test_failure_is_recorded_with_the_metrics_so_far(tmp_path):
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="synthetic failure"):
        trainer(cb, tmp_path, limit_val_batches=0).fit(TinyModule(fail_at_step=2), loader())
    with ExperimentDB(tmp_path / "c.db") as db:
        exp = db.experiment(cb.experiment_id)
        assert exp["status"] == "failed" and "synthetic failure" in exp["error"]
        assert [s for s, _ in values(db, exp["id"], "loss")] == [1, 2]


class FailsInSanityCheck(TinyModule):
    def validation_step(self, batch, batch_idx):
        raise ValueError("broken validation")


def test_failure_before_training_starts_records_nothing(tmp_path):
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    with pytest.raises(ValueError, match="broken validation"):
        trainer(cb, tmp_path, num_sanity_val_steps=1).fit(FailsInSanityCheck(), loader(), loader(8))
    assert cb.experiment_id is None
    assert not (tmp_path / "c.db").exists()  # nothing ran: no row (and no database created for it)


def test_sigterm_is_recorded_as_interrupted(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class StopsAtStep2(TinyModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise SIGTERMException(143)
            return super().training_step(batch, batch_idx)

    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    with pytest.raises(SIGTERMException):
        trainer(cb, tmp_path, limit_val_batches=0).fit(StopsAtStep2(), loader())
    with ExperimentDB(tmp_path / "c.db") as db:
        exp = db.experiment(cb.experiment_id)
    assert exp["status"] == "interrupted" and exp["error"].startswith("SIGTERMException")


def test_test_stage_creates_its_own_experiment(tmp_path):
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    model = TinyModule()
    t = trainer(cb, tmp_path, limit_val_batches=0)
    t.fit(model, loader())
    fit_id = cb.experiment_id
    t.test(model, loader(8), verbose=False)
    assert cb.experiment_id != fit_id and model.experiment_id == cb.experiment_id
    with ExperimentDB(tmp_path / "c.db") as db:
        assert [(e["stage"], e["status"]) for e in db.experiments()] == [("fit", "finished"), ("test", "finished")]
        assert db.metrics(cb.experiment_id) == []


def test_token_in_hparams_or_environment_never_reaches_the_db(tmp_path, monkeypatch):
    secret = f"hf_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    trainer(cb, tmp_path, limit_val_batches=0).fit(TinyModule(hf_token=secret), loader())
    with ExperimentDB(tmp_path / "c.db") as db:
        assert db.experiment(cb.experiment_id)["config"]["hparams"]["hf_token"] == "<redacted>"
    for p in tmp_path.iterdir():
        if p.name.startswith("c.db"):
            assert secret[3:].encode() not in p.read_bytes()


def test_non_zero_rank_never_opens_the_database(tmp_path):
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    fake_trainer = types.SimpleNamespace(
        is_global_zero=False, log_dir=str(tmp_path), global_step=0,
        strategy=types.SimpleNamespace(broadcast=lambda obj, src=0: 11),  # rank 0's id arrives by broadcast
    )
    module = TinyModule()
    cb.on_train_start(fake_trainer, module)
    cb.on_train_batch_start(fake_trainer, module, None, 0)
    cb.on_train_batch_end(fake_trainer, module, {"loss": torch.tensor(1.0)}, None, 0)
    cb.on_train_end(fake_trainer, module)
    cb.on_exception(fake_trainer, module, RuntimeError("x"))
    assert cb.experiment_id == 11 == module.experiment_id
    assert list(tmp_path.iterdir()) == []
