"""``transformers.Trainer`` with an opcomp optimizer, probes included.

    from opcomp.integrations.hf_trainer import OpcompTrainer

    trainer = OpcompTrainer(model=model, args=args, train_dataset=data, expr="sam_sgd")
    trainer.train()

Expressions without probes take the Trainer's own path: its backward, its gradient accumulation
and ``max_grad_norm`` clipping, then ``optimizer.step()`` — opcomp is an ordinary torch optimizer
there. Expressions with probes need ``opt.step(closure)``, and the Trainer's loop calls ``step()``
without one after the backward it ran itself; so for them each training step runs
``opt.step(closure)`` with a closure that returns ``compute_loss`` (opcomp runs every backward),
and the loop's own ``step()`` that follows is a no-op. Clipping then belongs in the expression
(``clip_global``), and gradient accumulation and fp16 loss scaling, which would act between the
Trainer's backward and its step, are refused with the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
import transformers

import opcomp
from opcomp.errors import OpcompError, OpcompWarning

logger = logging.getLogger(__name__)

IGNORED = ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
"""TrainingArguments that configure the Trainer's own optimizer; OpcompTrainer warns when one is set."""


def _default(name: str):
    return next(f.default for f in dataclasses.fields(transformers.TrainingArguments) if f.name == name)


def _value(setting):
    """An argument as written: the optimizer's name rather than its enum."""
    return getattr(setting, "value", setting)


class ClosureStepper(torch.optim.Optimizer):
    """The optimizer a Trainer's loop holds for a probe expression: :meth:`step_with` runs the
    opcomp optimizer with a closure, and the closure-less ``step()`` the loop calls afterwards
    does nothing. Param groups, state and state dicts are the opcomp optimizer's own, so learning
    rate schedules and checkpoints act on it."""

    def __init__(self, optimizer: opcomp.Optimizer) -> None:  # no super().__init__: everything is shared
        self.optimizer = optimizer
        self._stepped = False

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

    def step_with(self, closure) -> torch.Tensor:
        loss = self.optimizer.step(closure)
        self._stepped = True
        return loss

    def step(self, closure=None):
        if closure is not None:
            return self.step_with(closure)
        if not self._stepped:
            raise OpcompError(
                "this optimizer steps inside OpcompTrainer.training_step, with a closure; the loop called "
                "step() without one first"
            )
        self._stepped = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:  # explain(), assignments(), skipped_steps…
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)


class OpcompTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer is ``opcomp.build(expr, model, lr=..., **build_options)``;
    any scheduler the arguments ask for drives its learning rate. The lr is ``args.learning_rate``
    when set, else the expression's recommended one (logged); the arguments that configure the
    Trainer's own optimizer (``optim``, ``weight_decay``, ``adam_*``) are ignored, with a warning
    when set."""

    def __init__(self, *args, expr: str, build_options: dict | None = None, **kwargs) -> None:
        self.expr, self.build_options = expr, dict(build_options or {})
        self.stepper: ClosureStepper | None = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self._warn_ignored()
            options = {"lr": self._learning_rate(), **self.build_options}
            built = opcomp.build(self.expr, model or self.model, **options)
            self._log_learning_rate(built)
            if built.needs_closure:
                self._refuse_between_backward_and_step()
                built = self.stepper = ClosureStepper(built)
            self.optimizer = built
        return self.optimizer

    def _learning_rate(self) -> float | None:
        """``learning_rate`` when the arguments set it; else None, and the build takes the expression's
        recommended lr: the Trainer's default (5e-5, an AdamW fine-tuning rate) would leave most
        presets standing still."""
        return None if self.args.learning_rate == _default("learning_rate") else self.args.learning_rate

    def _log_learning_rate(self, built: opcomp.Optimizer) -> None:
        rates = sorted({group["lr"] for group in built.param_groups})
        shown = ", ".join(f"{lr:g}" for lr in rates)
        if self._learning_rate() is not None:
            logger.info("OpcompTrainer: %s steps at TrainingArguments.learning_rate=%s", self.expr, shown)
            return
        logger.warning(
            "OpcompTrainer: %s steps at its recommended lr %s, since TrainingArguments.learning_rate is at the "
            "Trainer's default %g (set learning_rate to another value to use it)",
            self.expr,
            shown,
            _default("learning_rate"),
        )

    def _warn_ignored(self) -> None:
        """Arguments that configure the Trainer's own optimizer, which the expression replaces."""
        ignored = [
            f"{name}={_value(getattr(self.args, name))!r}"
            for name in IGNORED
            if _value(getattr(self.args, name)) != _value(_default(name))
        ]
        if ignored:
            warnings.warn(
                f"OpcompTrainer ignores {', '.join(ignored)}: the optimizer is {self.expr}, whose options say "
                f"everything it does — write them in the expression (e.g. 'adamw[wd=0.1]') or pass build_options",
                OpcompWarning,
                stacklevel=3,
            )

    def _refuse_between_backward_and_step(self) -> None:
        """What the Trainer does between its backward and its step has no place in a probe step."""
        if self.args.gradient_accumulation_steps > 1:
            raise OpcompError(
                f"{self.expr} evaluates the loss again inside its step, so the Trainer's gradient accumulation "
                f"(gradient_accumulation_steps={self.args.gradient_accumulation_steps}) cannot feed it: raise "
                "per_device_train_batch_size instead, or write the loop yourself with a closure that loops over "
                "the micro-batches (docs/integrations.md)"
            )
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise OpcompError(
                f"{self.expr} runs its own backward passes, so the Trainer cannot clip between backward and step "
                f"(max_grad_norm={self.args.max_grad_norm}): set max_grad_norm=0 and clip in the expression, "
                "e.g. sam(momentum(clip_global[max_norm=1](g)))"
            )
        if self.args.fp16:
            raise OpcompError(
                f"{self.expr} runs its own backward passes, which fp16 loss scaling cannot see: use bf16=True"
            )

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.stepper is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        return self.stepper.step_with(closure).detach()
