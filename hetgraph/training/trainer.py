"""Training the graph adapters of a :class:`~hetgraph.HetGraphLM`; the base model stays frozen.

Under ``torchrun`` the same call trains data-parallel (:mod:`hetgraph.training.ddp`): every
rank runs it with the same arguments; rank 0 holds the directory lock and writes checkpoints,
the best adapter and ``training.json``; checkpoints resume with any number of processes.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hetgraph.allocator import RELEASE_EVERY_STEPS, release_free_memory
from hetgraph.configuration import ConfigError
from hetgraph.distributed import DistributedContext, current_context
from hetgraph.errors import HetgraphError, NonFiniteError
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.fusion.model_card import write_model_card
from hetgraph.fusion.persistence import check_knowledge, read_adapter_config
from hetgraph.integrity import atomic_write_json_record
from hetgraph.io import ADAPTER_WEIGHTS, CHECKPOINT_DIR, TRAINING_RESULT
from hetgraph.locking import directory_lock
from hetgraph.models.checks import check_context_length, check_token_ids
from hetgraph.storage import remove_stale_temporaries, storage_errors
from hetgraph.training.checkpoint import (
    check_init_from,
    load_adapter_weights,
    load_initial_adapter,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from hetgraph.training.config import TrainingConfig
from hetgraph.training.ddp import DataParallelLoss
from hetgraph.training.precision import autocast_dtype, precision_name, training_autocast
from hetgraph.training.schedule import optimizer_and_schedule, sample_starts, split_tokens

if TYPE_CHECKING:
    from hetgraph.evaluation import EvalConfig


logger = logging.getLogger(__name__)
#: What to do after a full disk: the best adapter saved so far and the last checkpoint stay.
RESUME_HINT = (
    "run the same train command again (it resumes from the last checkpoint; the "
    "best adapter saved so far is kept)"
)


class TrainingError(HetgraphError):
    """The data given to :func:`train_adapter` cannot train the adapter (the message says
    why and what to change)."""


@dataclass
class TrainingResult:
    """What :func:`train_adapter` did: steps run, losses, valid perplexities, best step."""

    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    valid_ppl: dict[int, float] = field(default_factory=dict)
    best_step: int | None = None
    best_valid_ppl: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    mixed_precision: str = "no"  # what the run trained in ("bf16" or "no"), "auto" resolved

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (as written to ``training.json``)."""
        data = asdict(self)
        data["valid_ppl"] = {str(k): v for k, v in self.valid_ppl.items()}
        return data


class _TrainingRun:
    """The state of one :func:`train_adapter` call: optimiser, schedule, results so far."""

    def __init__(
        self,
        lm: HetGraphLM,
        train_split: Any,
        valid_split: Any | None,
        config: TrainingConfig,
        out_dir: Path,
        eval_config: EvalConfig | None,
        ctx: DistributedContext,
    ) -> None:
        self.lm, self.valid_split, self.config, self.out_dir = lm, valid_split, config, out_dir
        self.eval_config, self.ctx = eval_config, ctx
        self.tokens = split_tokens(train_split)
        self.num_rows = len(lm.engine.datastore)
        self._check_inputs()
        self.device = next(lm.engine.adapters.parameters()).device
        self.from_datastore = (
            lm.engine.can_run_from_datastore
            if config.from_datastore is None
            else config.from_datastore
        )
        if self.from_datastore and not lm.engine.can_run_from_datastore:
            raise ConfigError(
                "from_datastore=True needs retrieval and fusion at the LM-head "
                "input and key features (FusionEngine.can_run_from_datastore); "
                "set from_datastore to null to train with full forwards"
            )
        self.autocast = autocast_dtype(config.mixed_precision, self.device)
        if self.autocast is not None:
            logger.info(
                "training in %s mixed precision (torch.autocast); weights, optimiser, "
                "loss and evaluations stay float32",
                self.autocast,
            )
        torch.manual_seed(config.seed)
        self.params = [p for p in lm.parameters() if p.requires_grad]
        self.parallel = DataParallelLoss(
            self.params, lambda d: self.micro_batch_loss(d), config.batch_size, ctx
        )
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, config)
        self.result = TrainingResult(mixed_precision=precision_name(self.autocast))
        self.start_step = 0
        self.bad_evals = 0
        self.seen_tokens = 0
        self.seconds_before = 0.0  # training seconds of earlier (interrupted) calls, so
        # result.seconds (also in every checkpoint) is the time summed over resumed calls
        self.started = time.perf_counter()

    def _check_inputs(self) -> None:
        tokens, config = self.tokens, self.config
        if config.batch_size < self.ctx.world_size:
            raise TrainingError(
                f"training.batch_size {config.batch_size} is the global batch and "
                f"must be at least the number of processes "
                f"({self.ctx.world_size}); raise it or start fewer processes"
            )
        if len(tokens) < config.context_length + 1:
            raise TrainingError(
                f"the train split has {len(tokens)} tokens, "
                f"fewer than context_length + 1 = {config.context_length + 1}: "
                "lower training.context_length or use more text "
                "(a larger --max-tokens)"
            )
        if len(tokens) > self.num_rows + 1:
            raise TrainingError(
                f"the train split has {len(tokens)} tokens but the datastore "
                f"only {self.num_rows} rows: "
                "train on the split the datastore was built from "
                "(same --max-tokens)"
            )
        check_context_length(self.lm.model, config.context_length, "training.context_length")
        check_token_ids(tokens, self.lm.model, "the train split")
        if any(p.requires_grad for p in self.lm.model.parameters()):
            raise RuntimeError(
                "the base model has trainable parameters; HetGraphLM freezes it, do not unfreeze"
            )

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint`` when one exists; returns whether it did."""
        # Rank 0 reads (and may repair) the checkpoint; every rank then loads its files.
        state = self.ctx.run_on_main(lambda: read_checkpoint(self.out_dir))
        if state is None:
            return False
        checkpoint = read_adapter_config(self.out_dir / CHECKPOINT_DIR)
        saved = checkpoint["fusion"]
        # The same knowledge graph (or none) as the run that wrote the checkpoint.
        knowledge = self.lm.engine.knowledge
        identity = None if knowledge is None else knowledge.identity()
        check_knowledge(checkpoint, identity, self.out_dir / CHECKPOINT_DIR)
        # Through from_dict: a checkpoint from before a new option compares by its default.
        if (
            TrainingConfig.from_dict(state["config"]).to_dict() != self.config.to_dict()
            or FusionConfig.from_dict(saved).to_dict() != self.lm.config.to_dict()
        ):
            raise TrainingError(
                f"{self.out_dir}/checkpoint was written with other training "
                "or fusion settings; use the same settings to resume, or a new "
                "--out directory"
            )
        restore_checkpoint(self.lm, self.optimizer, self.out_dir, state, self.device)
        self.scheduler.last_epoch = self.start_step = state["step"]
        self.bad_evals = state["bad_evals"]
        self.seconds_before = state["result"]["seconds"]
        self.result = TrainingResult(
            **{
                **state["result"],
                "valid_ppl": {int(k): v for k, v in state["result"]["valid_ppl"].items()},
            }
        )
        self.result.mixed_precision = precision_name(self.autocast)  # this call's, if mixed
        return True

    def evaluate(self, step: int) -> bool:
        """Valid perplexity at ``step``; saves the adapter when it is the best so far.
        Returns whether early stopping triggers."""
        from hetgraph.evaluation import model_perplexity

        if self.valid_split is None:
            return False
        lm, result = self.lm, self.result
        lm.eval()
        ppl = float(
            model_perplexity(lm, self.valid_split, self.eval_config, self.config.eval_tokens)
        )
        release_free_memory()  # the evaluation's temporaries (hetgraph.allocator)
        lm.train()
        if not math.isfinite(ppl):
            raise NonFiniteError(
                f"training: the valid perplexity at step {step} is {ppl}; the adapter saved "
                f"in {self.out_dir} is the last good one. Lower the learning rate "
                f"(lr {self.config.lr}) or check the datastore for damaged keys or features",
                stage="training",
            )
        result.valid_ppl[step] = ppl
        if result.best_valid_ppl is None or ppl < result.best_valid_ppl:
            result.best_valid_ppl, result.best_step, self.bad_evals = ppl, step, 0
            if self.ctx.is_main:
                lm.save_pretrained(self.out_dir)
        else:
            self.bad_evals += 1
        return self.config.patience > 0 and self.bad_evals >= self.config.patience

    def save_checkpoint(self, step: int) -> None:
        self.result.seconds = self.seconds_before + time.perf_counter() - self.started
        if not self.ctx.is_main:
            return
        write_checkpoint(
            self.lm,
            self.optimizer,
            self.out_dir,
            {
                "step": step,
                "bad_evals": self.bad_evals,
                "config": self.config.to_dict(),
                "result": self.result.to_dict(),
            },
        )

    def micro_batch_loss(self, draw: int) -> Tensor:
        """Cross-entropy of micro-batch number ``draw`` (a seeded sample of spans; under
        ``torchrun`` this rank's share of it)."""
        config, device, share = self.config, self.device, self.parallel.share
        if self.from_datastore:
            # Contiguous spans, like text: neighbouring rows retrieve overlapping
            # neighbours, so shared windows keep the graph small.
            starts = sample_starts(
                self.num_rows, config.context_length, config.batch_size, config.seed, draw
            )[share.start : share.stop]
            offsets = starts[:, None] + np.arange(config.context_length)[None, :]
            labels = torch.from_numpy(
                self.lm.engine.datastore.next_tokens[offsets].astype(np.int64)
            ).to(device)
            with training_autocast(self.autocast, device):
                logits = self.lm.forward_from_datastore(torch.from_numpy(offsets))
        else:
            starts = sample_starts(
                len(self.tokens), config.context_length + 1, config.batch_size, config.seed, draw
            )[share.start : share.stop]
            offsets = starts[:, None] + np.arange(config.context_length)[None, :]
            input_ids = torch.from_numpy(self.tokens[offsets]).to(device)
            labels = torch.from_numpy(self.tokens[offsets + 1]).to(device)
            rows = torch.from_numpy(offsets).to(device)
            with training_autocast(self.autocast, device):
                logits = self.lm(input_ids, query_positions=rows, use_cache=False).logits
        self.seen_tokens += labels.numel()
        logits = logits.float()  # the loss in float32, also under mixed precision
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        )

    def optimizer_step(self, step: int) -> float:
        """One optimiser step (``grad_accumulation`` micro-batches); returns the mean loss."""
        config, parallel = self.config, self.parallel
        # Dropout, reproducible on resume (each rank its own stream; rank 0 = one process).
        torch.manual_seed(config.seed * 1_000_003 + step + self.ctx.rank * 7_919_000_011)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(config.grad_accumulation):
            with parallel.sync(micro == config.grad_accumulation - 1):
                loss = parallel.loss(step * config.grad_accumulation + micro)
                value = parallel.global_value(loss)  # the same on every rank
                if not math.isfinite(value):
                    self.refuse_non_finite(step, value)
                (loss / config.grad_accumulation).backward()
            loss_sum += value / config.grad_accumulation
        if config.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss_sum

    def refuse_non_finite(self, step: int, loss: float) -> None:
        """Stop before a non-finite loss reaches the weights; what is on disk stays intact."""
        state = self.ctx.run_on_main(lambda: read_checkpoint(self.out_dir))
        last = (
            f"the last checkpoint ({self.out_dir / CHECKPOINT_DIR}, step {state['step']}) "
            "is intact and resumes"
            if state is not None
            else "no checkpoint was written"
        )
        raise NonFiniteError(
            f"training: the loss at step {step + 1} is {loss} (not finite); {last}. Lower the "
            f"learning rate (lr {self.config.lr}), keep clip_norm > 0, or check the datastore "
            "for damaged keys",
            stage="training",
        )

    def after_step(self, step: int) -> bool:
        """Evaluate and checkpoint after optimiser step ``step`` (0-based) as configured;
        returns whether training stops early."""
        config, done = self.config, step + 1
        evaluated = (
            config.eval_every and done % config.eval_every == 0
        ) or done == config.max_steps
        if done % RELEASE_EVERY_STEPS == 0:
            release_free_memory()  # the heap fragments on CPU (hetgraph.allocator)
        if evaluated and self.evaluate(done):
            self.result.stopped_early = True
            self.save_checkpoint(done)
            return True
        if evaluated or (config.checkpoint_every and done % config.checkpoint_every == 0):
            self.save_checkpoint(done)
        return False

    def run(self, show_progress: bool, stop_after: int | None) -> None:
        lm, config, result = self.lm, self.config, self.result
        if self.start_step == 0 and self.valid_split is not None and config.eval_every:
            # Step 0 is the starting point (zero gates: the base model; or the --init-from
            # adapter): the reference every later evaluation must beat.
            self.evaluate(0)
        lm.train()
        bar = tqdm(
            total=config.max_steps,
            initial=self.start_step,
            desc="training adapter",
            disable=not show_progress,
            unit="step",
        )
        started = self.started = time.perf_counter()
        try:
            with lm:
                for step in range(self.start_step, config.max_steps):
                    loss = self.optimizer_step(step)
                    result.train_losses.append(loss)
                    result.steps = step + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    if self.after_step(step):
                        break
                    if stop_after is not None and step + 1 - self.start_step >= stop_after:
                        raise KeyboardInterrupt(f"stopped after {stop_after} steps (stop_after)")
        finally:
            bar.close()
            lm.eval()
        result.seconds = self.seconds_before + time.perf_counter() - started
        seen = self.ctx.sum_float(float(self.seen_tokens))  # over all ranks
        result.tokens_per_second = seen / max(time.perf_counter() - started, 1e-9)

    def finish(self) -> None:
        """Leave the best adapter in memory and on disk, and write ``training.json``."""
        if self.valid_split is None:
            if self.ctx.is_main:
                self.lm.save_pretrained(self.out_dir)
        else:
            self.ctx.barrier()  # rank 0 has written the best adapter
            if self.result.best_step is not None and (self.out_dir / ADAPTER_WEIGHTS).is_file():
                load_adapter_weights(self.lm, self.out_dir, self.device)
        if self.ctx.is_main:
            # Its own checksum: verify finds a changed value (read_json_record strips it).
            atomic_write_json_record(
                self.out_dir / TRAINING_RESULT,
                {"config": self.config.to_dict(), "result": self.result.to_dict()},
            )
            write_model_card(self.out_dir)  # now with the training tokens (best effort)


def train_adapter(
    lm: HetGraphLM,
    train_split: Any,
    valid_split: Any | None,
    config: TrainingConfig,
    out_dir: str | Path,
    *,
    eval_config: EvalConfig | None = None,
    resume: bool = True,
    show_progress: bool = True,
    stop_after: int | None = None,
    distributed: DistributedContext | None = None,
) -> TrainingResult:
    """Train ``lm``'s adapters on ``train_split`` (the text the datastore was built from).

    The base model is frozen and never receives gradients. Every training position's
    own neighbourhood in the datastore is hidden from it by the leakage filter
    (``query_positions`` = its datastore row). The best adapter by valid perplexity is
    saved to ``out_dir`` with :meth:`HetGraphLM.save_pretrained`; ``out_dir/checkpoint``
    holds a resumable checkpoint (adapter, optimiser, step), and a run started again with
    the same arguments continues from it. ``out_dir`` is locked while training runs
    (:func:`hetgraph.locking.directory_lock`), so a second writer is refused.

    A non-finite training loss or valid perplexity stops training with a
    :class:`~hetgraph.evaluation.NonFiniteError` before the optimiser applies it; the last
    checkpoint and the best adapter on disk stay as they were.

    Args:
        lm: the model with adapters to train.
        train_split: a ``TokenizedSplit`` whose rows are the datastore's rows.
        valid_split: split for periodic valid perplexity (``None`` skips evaluation).
        config: the training settings.
        out_dir: where the adapter, checkpoints and ``training.json`` go.
        eval_config: windows of the valid evaluations (:func:`hetgraph.evaluation.model_perplexity`
            over the first ``config.eval_tokens`` valid tokens); default :class:`EvalConfig`.
        resume: continue from ``out_dir/checkpoint`` when present.
        show_progress: tqdm bar.
        stop_after: stop (as if interrupted, raising ``KeyboardInterrupt``) once this many
            steps have run in this call; for testing resumption.
        distributed: the ``torchrun`` job to train data-parallel with (every rank calls this
            with the same arguments); default :func:`~hetgraph.distributed.current_context`.
    """
    out_dir = Path(out_dir)
    ctx = distributed or current_context()
    if config.init_from is not None:
        check_init_from(config.init_from, out_dir)
    with ExitStack() as lock, storage_errors(out_dir, RESUME_HINT):
        ctx.run_on_main(
            lambda: lock.enter_context(directory_lock(out_dir, "adapter directory")) and None
        )
        # Under the lock: what killed writers left (a checkpoint directory or adapter file
        # half-written under a temporary name) goes.
        ctx.run_on_main(lambda: remove_stale_temporaries(out_dir) and None)
        run = _TrainingRun(lm, train_split, valid_split, config, out_dir, eval_config, ctx)
        if not (resume and run.resume()) and config.init_from is not None:
            load_initial_adapter(lm, config.init_from, run.device, out_dir)
        run.run(show_progress and ctx.is_main, stop_after)
        run.finish()
    return run.result
