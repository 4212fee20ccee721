"""The transformers Trainer for croc: logs ``lm_loss`` and ``recon_loss`` next to ``loss``."""

from __future__ import annotations

import torch
from transformers import Trainer

from croc.train.param_groups import GROUPS, parameter_groups

__all__ = ["LOSS_PARTS", "CrocTrainer"]

LOSS_PARTS = ("lm_loss", "recon_loss")


class CrocTrainer(Trainer):
    """A ``transformers.Trainer`` whose model returns ``loss`` plus the parts ``lm_loss``/``recon_loss``.

    Each logged ``loss`` comes with the mean of every part over the same steps (averaged over
    processes), so a log line reads ``{"loss", "lm_loss", "recon_loss", ...}``. A part the model
    does not return (e.g. ``recon_loss`` outside the Croc stage) is not logged. Everything else
    (checkpoints, ``resume_from_checkpoint``, DeepSpeed, progress bars) is the stock Trainer's.
    """

    def __init__(self, *args, sequence_parallel=None, **kwargs) -> None:
        """``sequence_parallel``: a ``croc.train.sequence_parallel.SequenceParallel`` (from
        ``setup_sequence_parallel``) to train with DeepSpeed Ulysses; None trains unsplit."""
        if sequence_parallel is None and kwargs.get("args") is not None:
            from croc.train.sequence_parallel import from_parallelism_config

            sequence_parallel = from_parallelism_config(kwargs.get("model"), kwargs["args"])
        super().__init__(*args, **kwargs)
        self.sequence_parallel = sequence_parallel
        # the model's loss is a per-batch mean; let the Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_counts: dict[str, int] = {}

    def get_train_dataloader(self):
        if self.sequence_parallel is None:
            return super().get_train_dataloader()
        from croc.train.sequence_parallel import sequence_parallel_dataloader

        return sequence_parallel_dataloader(self, self.sequence_parallel)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sequence_parallel is not None and model.training:
            inputs = {**inputs, "sequence_parallel": self.sequence_parallel}
        outputs = model(**inputs)
        if model.training:
            for name in LOSS_PARTS:
                value = getattr(outputs, name, None)
                if value is not None:
                    self._part_sums[name] = self._part_sums.get(name, 0) + value.detach().float()
                    self._part_counts[name] = self._part_counts.get(name, 0) + 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_optimizer(self, model=None):
        """The stock optimizer, with one parameter group per module family (pool, projector,
        vision tower, LLM) at the learning rates of the model config's ``*_lr`` fields when any is set."""
        opt_model = self.model if model is None else model
        config = getattr(opt_model, "config", None)
        if self.optimizer is not None or not any(
            getattr(config, f, None) is not None for f, _ in GROUPS.values()
        ):
            return super().create_optimizer(model)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        no_decay = set(n for n, _ in opt_model.named_parameters()) - set(
            self.get_decay_parameter_names(opt_model)
        )
        groups = parameter_groups(opt_model, self.args.learning_rate, self.args.weight_decay, no_decay)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the weights of a checkpoint to resume from, with the model's own key conversion.

        transformers 5 saves LLaVA models under the original LLaVA key names and converts them
        back in ``from_pretrained``; the stock resume loads the file as a raw state dict and so
        misses every key. DeepSpeed and FSDP checkpoints keep the stock path.
        """
        model = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not hasattr(model, "from_pretrained"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        first = next(model.parameters())
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=first.dtype)
        model.load_state_dict(loaded.state_dict())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_sums:
            for name, total in self._part_sums.items():
                mean = total / self._part_counts[name]
                logs[name] = round(float(self.accelerator.gather(mean.reshape(1)).mean()), 4)
            self._part_sums, self._part_counts = {}, {}
        super().log(logs, start_time)
