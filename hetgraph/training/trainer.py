"""Training the graph adapters of a :class:`~hetgraph.HetGraphLM`; the base model stays frozen."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from hetgraph.configuration import JSONConfigMixin
from hetgraph.fusion import HetGraphLM

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"


@dataclass
class TrainingConfig(JSONConfigMixin):
    """Settings of :func:`train_adapter` (JSON-serialisable).

    Args:
        max_steps: optimiser steps.
        batch_size: sequences per micro-batch.
        context_length: tokens per training sequence (random windows of the train split).
        grad_accumulation: micro-batches per optimiser step.
        lr, weight_decay: AdamW settings for the adapter parameters.
        warmup_steps: linear warm-up, then ``schedule``.
        schedule: ``"inverse_sqrt"`` (GNN-LM), ``"cosine"`` or ``"constant"``.
        clip_norm: gradient-norm clipping (``0`` disables).
        eval_every: steps between valid-perplexity evaluations (``0`` = only at the end).
        eval_tokens: valid tokens scored per evaluation.
        patience: evaluations without improvement before early stopping (``0`` = never stop).
        checkpoint_every: steps between resumable checkpoints (``0`` = at evaluations only).
        seed: makes data order, dropout and initialisation reproducible, across resumes too.
        from_datastore: train from the stored keys without running the base model
            (:meth:`HetGraphLM.forward_from_datastore`; each micro-batch is
            ``batch_size`` random spans of ``context_length`` datastore rows). ``None``: whenever the
            fusion configuration allows it (the default one does), else full forwards over
            random windows of the train split.
    """

    max_steps: int = 300
    batch_size: int = 4
    context_length: int = 256
    grad_accumulation: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    schedule: str = "inverse_sqrt"
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 4096
    patience: int = 3
    checkpoint_every: int = 50
    seed: int = 0
    from_datastore: bool | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("inverse_sqrt", "cosine", "constant"):
            raise ValueError(f"schedule must be inverse_sqrt, cosine or constant, got {self.schedule!r}")
        for name in ("max_steps", "batch_size", "context_length", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")



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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (as written to ``training.json``)."""
        data = asdict(self)
        data["valid_ppl"] = {str(k): v for k, v in self.valid_ppl.items()}
        return data


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based)."""
    warmup = max(config.warmup_steps, 0)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _sample_starts(num_tokens: int, length: int, count: int, seed: int, step: int) -> np.ndarray:
    # One generator per step: the data order is the same whether or not the run resumed.
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, max(1, num_tokens - length), size=count)


def _save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            key = f"{param_id}.{name}"
            if isinstance(value, Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, str(path))
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_checkpoint(lm: HetGraphLM, optimizer: torch.optim.Optimizer, out_dir: Path,
                      trainer_state: dict[str, Any]) -> None:
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        for child in tmp.iterdir():
            child.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(tmp)
    trainer_state = {**trainer_state, "optimizer": _save_optimizer(optimizer, tmp / OPTIMIZER_WEIGHTS)}
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    # Swap in the new checkpoint only once it is complete: a kill leaves the old one usable.
    old = out_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        for child in old.iterdir():
            child.unlink()
        old.rmdir()


def _split_tokens(split: Any) -> np.ndarray:
    return np.asarray(split.tokens, dtype=np.int64)


def train_adapter(
    lm: HetGraphLM,
    train_split: Any,
    valid_split: Any | None,
    config: TrainingConfig,
    out_dir: str | Path,
    *,
    evaluate: Callable[[HetGraphLM, Any, int], float] | None = None,
    resume: bool = True,
    show_progress: bool = True,
    stop_after: int | None = None,
) -> TrainingResult:
    """Train ``lm``'s adapters on ``train_split`` (the text the datastore was built from).

    The base model is frozen and never receives gradients. Every training position's
    own neighbourhood in the datastore is hidden from it by the leakage filter
    (``query_positions`` = its datastore row). The best adapter by valid perplexity is
    saved to ``out_dir`` with :meth:`HetGraphLM.save_pretrained`; ``out_dir/checkpoint``
    holds a resumable checkpoint (adapter, optimiser, step), and a run started again with
    the same arguments continues from it.

    Args:
        lm: the model with adapters to train.
        train_split: a ``TokenizedSplit`` whose rows are the datastore's rows.
        valid_split: split for periodic valid perplexity (``None`` skips evaluation).
        config: the training settings.
        out_dir: where the adapter, checkpoints and ``training.json`` go.
        evaluate: ``(lm, split, max_tokens) -> perplexity``; defaults to
            :func:`hetgraph.evaluation.model_perplexity`.
        resume: continue from ``out_dir/checkpoint`` when present.
        show_progress: tqdm bar.
        stop_after: stop (as if interrupted, raising ``KeyboardInterrupt``) once this many
            steps have run in this call; for testing resumption.
    """
    if evaluate is None:
        from hetgraph.evaluation import model_perplexity as evaluate
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = _split_tokens(train_split)
    num_rows = len(lm.datastore)
    if len(tokens) < config.context_length + 1:
        raise ValueError(f"the train split has {len(tokens)} tokens, fewer than context_length + 1 = "
                         f"{config.context_length + 1}: lower --context-length or use more text")
    if len(tokens) > num_rows + 1:
        raise ValueError(f"the train split has {len(tokens)} tokens but the datastore only {num_rows} rows: "
                         "train on the split the datastore was built from (same --max-tokens)")
    device = next(lm.parameters()).device
    base_params = list(lm.model.parameters())
    if any(p.requires_grad for p in base_params):
        raise RuntimeError("the base model has trainable parameters; HetGraphLM freezes it, do not unfreeze")

    from_datastore = lm.can_run_from_datastore if config.from_datastore is None else config.from_datastore
    if from_datastore and not lm.can_run_from_datastore:
        raise ValueError("from_datastore=True needs retrieval and fusion at the LM-head input and no c2c "
                         "edges; set from_datastore to null to train with full forwards")
    next_tokens = lm.datastore.next_tokens
    torch.manual_seed(config.seed)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    result = TrainingResult()
    start_step = 0
    bad_evals = 0
    checkpoint = out_dir / CHECKPOINT_DIR
    if resume and (checkpoint / TRAINER_STATE).is_file():
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        if state["config"] != config.to_dict():
            raise ValueError(f"{checkpoint} was written with other training settings; use the same "
                             "settings to resume, or a new --out directory")
        lm.load_state_dict(load_file(str(checkpoint / "adapter.safetensors"), device=str(device)))
        _load_optimizer(optimizer, checkpoint / OPTIMIZER_WEIGHTS, state["optimizer"])
        scheduler.last_epoch = state["step"]
        start_step = state["step"]
        bad_evals = state["bad_evals"]
        result = TrainingResult(**{**state["result"], "valid_ppl": {
            int(k): v for k, v in state["result"]["valid_ppl"].items()}})

    def run_eval(step: int) -> bool:
        nonlocal bad_evals
        if valid_split is None:
            return False
        lm.eval()
        ppl = float(evaluate(lm, valid_split, config.eval_tokens))
        lm.train()
        result.valid_ppl[step] = ppl
        if result.best_valid_ppl is None or ppl < result.best_valid_ppl:
            result.best_valid_ppl, result.best_step, bad_evals = ppl, step, 0
            lm.save_pretrained(out_dir)
        else:
            bad_evals += 1
        return config.patience > 0 and bad_evals >= config.patience

    def save_checkpoint(step: int) -> None:
        _write_checkpoint(lm, optimizer, out_dir, {
            "step": step, "bad_evals": bad_evals, "config": config.to_dict(), "result": result.to_dict()})

    if start_step == 0 and valid_split is not None and config.eval_every:
        # Step 0 is the base model (zero gates): the reference every later evaluation must beat.
        run_eval(0)
    lm.train()
    started = time.perf_counter()
    seen_tokens = 0
    bar = tqdm(total=config.max_steps, initial=start_step, desc="training adapter",
               disable=not show_progress, unit="step")
    lm.attach()
    try:
        for step in range(start_step, config.max_steps):
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout, reproducible on resume
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(config.grad_accumulation):
                draw = step * config.grad_accumulation + micro
                if from_datastore:
                    # Contiguous spans, like text: neighbouring rows retrieve overlapping
                    # neighbours, so shared windows keep the graph small.
                    starts = _sample_starts(num_rows, config.context_length, config.batch_size,
                                            config.seed, draw)
                    offsets = starts[:, None] + np.arange(config.context_length)[None, :]
                    labels = torch.from_numpy(next_tokens[offsets].astype(np.int64)).to(device)
                    logits = lm.forward_from_datastore(torch.from_numpy(offsets)).float()
                else:
                    starts = _sample_starts(len(tokens), config.context_length + 1, config.batch_size,
                                            config.seed, draw)
                    offsets = starts[:, None] + np.arange(config.context_length)[None, :]
                    input_ids = torch.from_numpy(tokens[offsets]).to(device)
                    labels = torch.from_numpy(tokens[offsets + 1]).to(device)
                    rows = torch.from_numpy(offsets).to(device)
                    logits = lm(input_ids, query_positions=rows, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                (loss / config.grad_accumulation).backward()
                loss_sum += float(loss.detach()) / config.grad_accumulation
                seen_tokens += labels.numel()
            if config.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            scheduler.step()
            result.train_losses.append(loss_sum)
            result.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1 == config.max_steps
            evaluated = False
            if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
                evaluated = True
                if run_eval(step + 1):
                    result.stopped_early = True
                    save_checkpoint(step + 1)
                    break
            if evaluated or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
                save_checkpoint(step + 1)
            if stop_after is not None and step + 1 - start_step >= stop_after:
                raise KeyboardInterrupt(f"stopped after {stop_after} steps (stop_after)")
    finally:
        bar.close()
        lm.detach()
        lm.eval()
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = seen_tokens / max(result.seconds, 1e-9)
    if valid_split is None:
        lm.save_pretrained(out_dir)
    elif result.best_step is not None and (out_dir / "adapter.safetensors").is_file():
        # Leave the best adapter (not the last one) in memory, as on disk.
        lm.load_state_dict(load_file(str(out_dir / "adapter.safetensors"), device=str(device)))
    (out_dir / "training.json").write_text(json.dumps(
        {"config": config.to_dict(), "result": result.to_dict()}, indent=2) + "\n")
    return result
