r"""The training loop of the LoRA control (:func:`hetgraph.training.lora.train_lora_control`).

It mirrors :class:`hetgraph.training.trainer._TrainingRun` step for step, in one process:
the same micro-batches (:func:`training_blocks`), the same dropout seeds, AdamW, schedule,
clipping, valid evaluations (step 0 included), early stopping and best-on-valid saving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hetgraph.errors import NonFiniteError
from hetgraph.models.layers import model_device
from hetgraph.training.config import TrainingConfig
from hetgraph.training.lora_persistence import PEFT_WEIGHTS, save_lora_control
from hetgraph.training.precision import autocast_dtype, training_autocast
from hetgraph.training.schedule import optimizer_and_schedule, sample_starts
from hetgraph.training.trainer import TrainingResult

logger = logging.getLogger(__name__)


@dataclass
class LoraControlResult(TrainingResult):
    """What :func:`train_lora_control` did: a :class:`~hetgraph.training.TrainingResult`
    plus the control's size; ``model`` is the trained PEFT model (not serialised)."""

    rank: int = 0
    trained_params: int = 0
    target_params: int = 0
    target_modules: list[str] = field(default_factory=list)
    tokens: int = 0
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (as written to ``training.json``), without the model."""
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"
        }
        data["valid_ppl"] = {str(k): v for k, v in self.valid_ppl.items()}
        return data


def training_blocks(
    tokens: np.ndarray, config: TrainingConfig, draw: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels ``[batch_size, context_length]`` of micro-batch ``draw``: the spans
    :func:`~hetgraph.training.train_adapter` draws for the same ``config`` (full forwards;
    from the datastore, whose ``len(tokens) - 1`` rows give the same starts, labels and
    spans)."""
    starts = sample_starts(
        len(tokens), config.context_length + 1, config.batch_size, config.seed, draw
    )
    offsets = starts[:, None] + np.arange(config.context_length)[None, :]
    return tokens[offsets], tokens[offsets + 1]


class LoraRun:
    """One :func:`train_lora_control` call: optimiser, schedule, valid evaluations."""

    def __init__(
        self,
        peft_model: Any,
        tokens: np.ndarray,
        valid_split: Any | None,
        config: TrainingConfig,
        eval_config: Any,
        out_dir: Path,
        record: dict[str, Any],
    ) -> None:
        self.model, self.tokens, self.valid_split = peft_model, tokens, valid_split
        self.config, self.eval_config = config, eval_config
        self.out_dir, self.record = out_dir, record
        self.device = model_device(peft_model)
        self.autocast = autocast_dtype(config.mixed_precision, self.device)
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, config)
        self.result = LoraControlResult(model=peft_model)
        self.bad_evals = 0

    def train_mode(self, mode: bool) -> None:
        # The base model stays in eval mode (no dropout of its own), as under HetGraphLM;
        # only the LoRA's dropout follows ``mode``.
        self.model.eval()
        for name, module in self.model.named_modules():
            if name.endswith(".lora_dropout"):
                module.train(mode)

    def step(self, step: int) -> float:
        config = self.config
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout, as the trainer seeds it
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accumulation):
            inputs, labels = training_blocks(
                self.tokens, config, step * config.grad_accumulation + micro
            )
            with training_autocast(self.autocast, self.device):
                logits = self.model(
                    input_ids=torch.from_numpy(inputs).to(self.device), use_cache=False
                ).logits
            logits = logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                torch.from_numpy(labels).to(self.device).reshape(-1),
            )
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"LoRA control: the loss at step {step + 1} is {value} (not finite); "
                    f"what {self.out_dir} holds is unchanged. Lower the learning rate "
                    f"(lr {config.lr}) or keep clip_norm > 0",
                    stage="training",
                )
            (loss / config.grad_accumulation).backward()
            total += value / config.grad_accumulation
            self.result.tokens += int(labels.size)
        if config.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def save(self) -> None:
        save_lora_control(
            self.model,
            self.out_dir,
            {
                **self.record,
                "best_step": self.result.best_step,
                "best_valid_ppl": self.result.best_valid_ppl,
                "tokens": self.result.tokens,
            },
        )

    def evaluate(self, step: int) -> bool:
        """Valid perplexity at ``step``, saving the best; returns whether to stop early."""
        from hetgraph.evaluation.lora import lora_perplexity

        if self.valid_split is None:
            return False
        self.train_mode(False)
        ppl = lora_perplexity(
            self.model, self.valid_split, self.eval_config, self.config.eval_tokens or None
        )
        self.train_mode(True)
        if not math.isfinite(ppl):
            raise NonFiniteError(
                f"LoRA control: the valid perplexity at step {step} is {ppl}; "
                f"{self.out_dir} holds the last good control. Lower the "
                f"learning rate (lr {self.config.lr})",
                stage="training",
            )
        result = self.result
        result.valid_ppl[step] = ppl
        if result.best_valid_ppl is None or ppl < result.best_valid_ppl:
            result.best_valid_ppl, result.best_step, self.bad_evals = ppl, step, 0
            self.save()
        else:
            self.bad_evals += 1
        return self.config.patience > 0 and self.bad_evals >= self.config.patience

    def run(self, show_progress: bool) -> LoraControlResult:
        config, result = self.config, self.result
        if self.valid_split is not None and config.eval_every:
            self.evaluate(0)  # the base model: the reference the LoRA must beat
        self.train_mode(True)
        started = time.perf_counter()
        try:
            for step in tqdm(
                range(config.max_steps),
                desc="training LoRA control",
                disable=not show_progress,
                unit="step",
            ):
                result.train_losses.append(self.step(step))
                result.steps = done = step + 1
                if (
                    (config.eval_every and done % config.eval_every == 0)
                    or done == config.max_steps
                ) and self.evaluate(done):
                    result.stopped_early = True
                    break
        finally:
            self.train_mode(False)
        logger.info("LoRA control: %d steps in %.1f s", result.steps, time.perf_counter() - started)
        if self.valid_split is None:
            self.save()
        elif result.best_step != result.steps:  # leave the best in memory, as on disk
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(
                self.model, load_file(str(self.out_dir / PEFT_WEIGHTS), device=str(self.device))
            )
        return result
