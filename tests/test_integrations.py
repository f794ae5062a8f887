"""opcomp inside the loops people use: transformers.Trainer (the adapter in opcomp.integrations),
and a Lightning-style closure. Tiny models, random init, nothing downloaded."""

from __future__ import annotations

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
