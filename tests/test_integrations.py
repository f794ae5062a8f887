"""opcomp inside the loops people use: transformers.Trainer (the adapter in opcomp.integrations),
and a Lightning-style closure. Tiny models, random init, nothing downloaded."""

from __future__ import annotations

import warnings

import hf
import pytest
import torch

import opcomp


def token_data(count: int = 8, length: int = 12, vocabulary: int = 97) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocabulary, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(tmp_path, expr: str, max_steps: int = 4, **arguments):
    from opcomp.integrations.hf_trainer import OpcompTrainer

    library = hf.transformers()
    torch.manual_seed(0)
    settings = {
        "output_dir": str(tmp_path),
        "max_steps": max_steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.01,
        "lr_scheduler_type": "linear",
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        **arguments,
    }
    args = library.TrainingArguments(**settings)
    return OpcompTrainer(model=hf.gpt2(), args=args, train_dataset=token_data(), expr=expr)


def parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("expr", "arguments"),
    [
        ("sam_sgd", {"max_grad_norm": 0.0}),  # probes: opt.step(closure) inside training_step
        ("fog", {}),  # the Trainer's own backward, clipping at its default max_grad_norm=1.0, then step()
    ],
)
def test_trainer_trains_saves_and_resumes_bitwise(tmp_path, expr, arguments):
    whole = trainer(tmp_path / "whole", expr, **arguments)
    whole.train()
    losses = [entry["loss"] for entry in whole.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    resumed = trainer(tmp_path / "resumed", expr, **arguments)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(parameters(whole.model), parameters(resumed.model)))
    assert (
        whole.optimizer.state_dict()["param_groups"][0]["lr"] == resumed.optimizer.state_dict()["param_groups"][0]["lr"]
    )


def test_trainer_with_probes_steps_as_the_closure_loop_does(tmp_path):
    """One batch of all the data per step (shuffling changes only the order of a sum): the Trainer's
    steps are opt.step(closure) with its compute_loss — which divides the summed token losses by
    the batch's label count, as the Trainer counts it (num_items_in_batch)."""
    run = trainer(
        tmp_path,
        "sam_sgd",
        max_steps=3,
        max_grad_norm=0.0,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    run.train()
    torch.manual_seed(0)
    model = hf.gpt2()
    batch = torch.stack([item["input_ids"] for item in token_data()])
    opt = opcomp.build("sam_sgd", model, lr=0.01)
    labels = torch.tensor(batch.numel())
    for _ in range(3):
        opt.step(lambda: model(batch, labels=batch, num_items_in_batch=labels).loss)
    for a, b in zip(parameters(run.model), parameters(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"max_grad_norm": 1.0}, "set max_grad_norm=0 and clip in the expression"),
        ({"max_grad_norm": 0.0, "gradient_accumulation_steps": 2}, "gradient accumulation"),
    ],
)
def test_trainer_refuses_what_would_act_between_its_backward_and_a_probe_step(tmp_path, arguments, words):
    run = trainer(tmp_path, "sam_sgd", **arguments)
    before = parameters(run.model)
    with pytest.raises(opcomp.OpcompError, match=words):
        run.train()
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(run.model)))


class Classifier:
    """A LightningModule (built lazily: lightning is imported by the test that needs it)."""

    @staticmethod
    def make(expr: str, **build):
        import lightning
        from torch import nn
        from torch.nn import functional as F

        class Module(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

            def training_step(self, batch, index):
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return opcomp.build(expr, self, lr=0.05, **build)

        return Module()


def classification_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)


@pytest.mark.parametrize("expr", ["sam_sgd", "mezo", "fog"])
def test_lightning_automatic_optimization_steps_as_the_closure_returning_the_loss(expr):
    """Lightning hands step() a closure that runs training_step, zero_grad and backward itself."""
    import lightning
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    x, y = classification_data()
    module = Classifier.make(expr)
    trainer = lightning.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    reference = Classifier.make(expr)
    opt = opcomp.build(expr, reference, lr=0.05)
    for step in range(3):
        torch.manual_seed(step)  # zo's noise is seeded by its node and step, not the global generator
        opt.step(lambda: F.cross_entropy(reference.net(x), y))
    trained, expected = parameters(module), parameters(reference)
    assert any(not torch.equal(a, b) for a, b in zip(expected, parameters(Classifier.make(expr))))
    assert all(torch.equal(a, b) for a, b in zip(trained, expected))


def test_trainer_uses_the_recommended_lr_unless_learning_rate_is_set_and_logs_which(tmp_path, caplog):
    library = hf.transformers()
    default = library.TrainingArguments(output_dir=str(tmp_path)).learning_rate
    with caplog.at_level("INFO", logger="opcomp.integrations.hf_trainer"):
        recommended = trainer(tmp_path / "a", "fog", learning_rate=default).create_optimizer()
        chosen = trainer(tmp_path / "b", "fog", learning_rate=0.002).create_optimizer()
    assert {g["lr"] for g in recommended.param_groups} == {0.03}  # fog's `# lr:`
    assert {g["lr"] for g in chosen.param_groups} == {0.002}
    said = [r.getMessage() for r in caplog.records]
    assert any("fog steps at its recommended lr 0.03" in line and "default 5e-05" in line for line in said)
    assert any("fog steps at TrainingArguments.learning_rate=0.002" in line for line in said)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"weight_decay": 0.1}, "weight_decay=0.1"),
        ({"optim": "sgd"}, "optim='sgd'"),
        ({"adam_beta1": 0.8, "adam_beta2": 0.99}, "adam_beta1=0.8, adam_beta2=0.99"),
    ],
)
def test_trainer_warns_about_optimizer_arguments_it_ignores(tmp_path, arguments, named):
    with pytest.warns(opcomp.OpcompWarning, match=f"OpcompTrainer ignores {named}"):
        trainer(tmp_path, "fog", **arguments).create_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", opcomp.OpcompWarning)
        trainer(tmp_path, "fog").create_optimizer()  # nothing set: nothing said


class Logged:
    """A LightningModule that logs its loss and updates a torchmetrics metric in training_step, and
    a Lightning logger and callback that keep what the loop saw."""

    @staticmethod
    def make(expr: str):
        import lightning
        import torchmetrics
        from torch import nn
        from torch.nn import functional as F

        class Module(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
                self.accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
                self.outputs: list[float] = []

            def training_step(self, batch, index):
                x, y = batch
                logits = self.net(x)
                loss = F.cross_entropy(logits, y)
                self.accuracy.update(logits, y)
                self.log("train_loss", loss, on_step=True, on_epoch=False)
                return loss

            def on_train_batch_end(self, outputs, batch, index) -> None:
                self.outputs.append(float(outputs["loss"]))

            def configure_optimizers(self):
                return opcomp.build(expr, self, lr=0.05)

        return Module()

    @staticmethod
    def logger():
        from lightning.pytorch.loggers.logger import Logger

        class Keep(Logger):
            name, version = "keep", 0

            def __init__(self) -> None:
                super().__init__()
                self.rows: list[dict] = []

            def log_metrics(self, metrics, step=None) -> None:
                self.rows.append(dict(metrics))

            def log_hyperparams(self, *args, **kwargs) -> None:
                pass

        return Keep()


@pytest.mark.parametrize("expr", ["sam_sgd", "asam_sgd", "fog"])
def test_lightning_logs_and_metrics_see_the_loss_at_p_once_per_step(expr):
    """SAM's second training_step runs at p + ε: its self.log, its metric update and its returned
    loss must not replace the training pass's (L(p), computed here by a plain loop)."""
    import lightning
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    x, y = classification_data()
    module, keep = Logged.make(expr), Logged.logger()
    trainer = lightning.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=keep,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    reference = Logged.make(expr)
    opt, at_p = opcomp.build(expr, reference, lr=0.05), []
    for _ in range(3):
        at_p.append(float(opt.step(lambda: F.cross_entropy(reference.net(x), y))))
    assert [row["train_loss"] for row in keep.rows if "train_loss" in row] == at_p
    assert module.outputs == at_p
    assert int(module.accuracy.update_count) == 3
