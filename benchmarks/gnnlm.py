"""GNN-LM end to end on the embedded default, and its speed against the base model.

Runs the main job (datastore → index → adapter training → four-way evaluation) with a
datastore of ``--tokens`` train tokens (default 200k) and ``--eval-tokens`` test tokens,
then measures in the same process:

* eval tokens/s of GNN-LM (retrieval + graph + adapter, k = 32, l = r = 1) as a ratio
  to a plain base forward over exactly the same windows;
* adapter training tokens/s from the stored keys as a ratio to the base forward;
* peak resident memory after each stage of the main job;
* greedy ``generate`` tokens/s with retrieval at every new position (KV cache on) as a
  ratio to the base model's ``generate``;
* the eval and ``generate`` ratios again with the adapter's window side read from a
  :class:`~hetgraph.NeighbourStates` table (the same logits), its build time and size.

The run directory is kept, so a second run reuses the datastore, index and adapter
(delete it, or pass ``--out`` elsewhere, to start over).

Usage: python benchmarks/gnnlm.py [--tokens 200000] [--eval-tokens 4096] [--steps N]
       [--factory IVF1024,SQfp16] [--nprobe 32]
Writes benchmarks/results/gnnlm.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from hetgraph.allocator import limit_primitive_cache
from hetgraph.corpus import tokenize_corpus
from hetgraph.corpus.windows import sliding_windows
from hetgraph.datastore import window_batches
from hetgraph.datastore.build import batch_input_ids
from hetgraph.evaluation import default_forward, gnn_forward, results_table
from hetgraph.evaluation.lm import batch_logits
from hetgraph.fusion import HetGraphLM, NeighbourStates
from hetgraph.fusion.config import HEAD
from hetgraph.fusion.context import CallOptions
from hetgraph.models.layers import output_embedding_input_hook_target
from hetgraph.models.loading import load_model
from hetgraph.pipeline import RunConfig, prepare_datastore, run_pipeline, set_threads
from hetgraph.training import train_adapter
from hetgraph.training.precision import autocast_dtype, training_autocast

PROMPTS = [
    "The :mod:`os` module provides",
    "To open a file for reading, use",
    "A list comprehension consists of",
    "The ``with`` statement is used to",
]


def forward_seconds(
    forward, tokens, context_length: int, stride: int, batch_size: int, device
) -> float:
    """Seconds of the forwards an evaluation runs (a TrimmedForward: the scored columns'
    logits only, as ``collect_lm_outputs`` asks for them)."""
    batches = window_batches(sliding_windows(len(tokens) - 1, context_length, stride), batch_size)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            batch_logits(forward, batch_input_ids(tokens, batch, device), batch)
    return time.perf_counter() - start


def generate_seconds(generate, tokenizer, new_tokens: int, device) -> tuple[float, int]:
    produced = 0
    start = time.perf_counter()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = generate(
            **ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        produced += out.shape[1] - ids["input_ids"].shape[1]
    return time.perf_counter() - start, produced


def training_tokens_per_s(model, tokenizer, store, index, corpus, config, steps: int) -> float:
    """Adapter training tokens/s from the stored keys (a fresh adapter, ``steps`` steps after
    one warm-up step, no evaluation or checkpoints), as ``make demo`` trains it."""
    torch.manual_seed(config.training.seed)
    lm = HetGraphLM(model, store, index, config.fusion, tokenizer=tokenizer)
    training = replace(
        config.training, max_steps=steps + 1, eval_every=0, checkpoint_every=0, warmup_steps=1
    )
    train_split = corpus.train.truncate(len(store) + 1)
    with tempfile.TemporaryDirectory() as scratch:
        warm = replace(training, max_steps=1)
        train_adapter(lm, train_split, None, warm, Path(scratch) / "warm", show_progress=False)
        result = train_adapter(
            lm, train_split, None, training, Path(scratch) / "timed", show_progress=False
        )
    return result.tokens_per_second


def training_step_phases(
    lm: HetGraphLM, rows_per_step: tuple[int, int], steps: int, dtype: torch.dtype | None
) -> dict[str, float]:
    """Milliseconds per training step from the stored keys, by phase (what
    :meth:`~hetgraph.FusionEngine.logits_from_datastore` and the trainer run, timed
    one after the other on random spans): the FAISS search, building the graph, the adapter
    forward, the frozen LM head's forward with the loss, its backward (the input gradient)
    and the adapter's backward. ``dtype``: the autocast dtype (``None``: float32)."""
    device = lm.engine.gates[next(iter(lm.engine.gates))].device
    generator = torch.Generator().manual_seed(0)
    batch, length = rows_per_step
    head = output_embedding_input_hook_target(lm.model)
    embedding = lm.model.get_input_embeddings()
    totals: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        totals[name] = totals.get(name, 0.0) + (now - since) * 1000
        return now

    lm.train()
    for step in range(steps + 1):  # step 0 warms up and is not counted
        if step == 1:
            totals.clear()
        starts = torch.randint(
            0, len(lm.engine.datastore) - length, (batch, 1), generator=generator
        )
        rows = (starts + torch.arange(length)).to(device)
        labels = torch.from_numpy(lm.engine.datastore.next_tokens[rows.cpu().numpy()]).long()
        now = time.perf_counter()
        with training_autocast(dtype, device):
            keys = lm.engine.graph_inputs.neighbour_features_of(rows.reshape(-1), HEAD)
            hidden = keys.float().view(batch, length, -1)
            retrieval = lm.engine.retrieve(hidden, CallOptions(query_positions=rows))
            now = tick("retrieval", now)
            graph = lm.engine.build_graph(retrieval, length)
            now = tick("graph", now)
            fused = lm.engine.fuse(HEAD, hidden, graph, embedding=embedding)
            now = tick("adapter_forward", now)
            logits = head.forward(fused).float()
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]), labels.view(-1).to(device)
            )
            now = tick("head_forward_and_loss", now)
        (fused_grad,) = torch.autograd.grad(loss, fused, retain_graph=True)
        now = tick("head_backward", now)
        fused.backward(fused_grad)
        tick("adapter_backward", now)
        lm.zero_grad(set_to_none=True)
    lm.eval()
    return {name: value / steps for name, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="run config (default: the demo's)"
    )
    parser.add_argument("--tokens", type=int, default=200_000, help="datastore train tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the config's)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    # Exact search over 200k keys costs about as much as the LM forward on 2 CPU cores;
    # IVF with 32 of 1024 lists gives the same perplexities (see the closing note) at a
    # fraction of the cost. Its lists hold the float16 keys as fp16 codes, exactly (the same
    # neighbours and distances as IVF1024,Flat, scanned about twice as fast).
    # `--factory auto` measures exact search.
    parser.add_argument("--factory", default="IVF1024,SQfp16", help="FAISS index factory")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query")
    parser.add_argument(
        "--train-speed-steps",
        type=int,
        default=8,
        help="adapter training steps timed for the training tokens/s",
    )
    parser.add_argument("--out", default="runs/bench-gnnlm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    limit_primitive_cache()  # as the command line does, before any computation

    config = RunConfig.from_json_file(args.config) if args.config else RunConfig.default()
    config.datastore = replace(config.datastore, max_tokens=args.tokens + 1)
    config.evaluation = replace(
        config.evaluation, max_tokens=args.eval_tokens + 1, valid_tokens=args.eval_tokens + 1
    )
    if args.steps is not None:
        config.training = replace(config.training, max_steps=args.steps)
    config.index = replace(config.index, factory=args.factory, nprobe=args.nprobe)
    config.out_dir = args.out
    config.threads = args.threads
    started = time.perf_counter()
    results = run_pipeline(config)
    pipeline_s = time.perf_counter() - started

    set_threads(args.threads)
    model, tokenizer = load_model(config.model)
    device = next(model.parameters()).device
    corpus = tokenize_corpus(config.corpus, tokenizer, show_progress=False)
    store, index = prepare_datastore(model, tokenizer, corpus, config, Path(config.out_dir))
    lm = HetGraphLM.from_pretrained(
        Path(config.out_dir) / "adapter", model, store, index, tokenizer=tokenizer
    )
    lm.eval()
    evaluation = config.evaluation
    tokens = corpus.test.tokens[: args.eval_tokens + 1]
    windows = (evaluation.context_length, evaluation.stride, evaluation.batch_size, device)
    base_forward = default_forward(model)
    forward_seconds(base_forward, tokens[:600], *windows)  # warm-up
    base_s = forward_seconds(base_forward, tokens, *windows)
    gnn_s = forward_seconds(gnn_forward(lm), tokens, *windows)
    started = time.perf_counter()
    states = NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), show_progress=False)
    states_build_s = time.perf_counter() - started
    states_s = forward_seconds(gnn_forward(lm, neighbour_states=states), tokens, *windows)
    base_gen_s, base_gen_n = generate_seconds(model.generate, tokenizer, args.new_tokens, device)
    gnn_gen_s, gnn_gen_n = generate_seconds(lm.generate, tokenizer, args.new_tokens, device)
    states_gen_s, states_gen_n = generate_seconds(
        partial(lm.generate, neighbour_states=states), tokenizer, args.new_tokens, device
    )
    del states
    train_tps = training_tokens_per_s(
        model, tokenizer, store, index, corpus, config, args.train_speed_steps
    )
    float32 = replace(config, training=replace(config.training, mixed_precision="no"))
    train_fp32_tps = training_tokens_per_s(
        model, tokenizer, store, index, corpus, float32, args.train_speed_steps
    )
    # The base forward in bfloat16 autocast (where the hardware has it): the same-precision
    # reference for bfloat16 training. Evaluations themselves run in float32.
    bf16 = autocast_dtype("auto", device)
    base_bf16_s = None
    if bf16 is not None:
        with training_autocast(bf16, device):
            base_bf16_s = forward_seconds(base_forward, tokens, *windows)
    step_rows = (config.training.batch_size, config.training.context_length)
    phases = {"float32": training_step_phases(lm, step_rows, args.train_speed_steps, None)}
    if bf16 is not None:
        phases["bf16"] = training_step_phases(lm, step_rows, args.train_speed_steps, bf16)
    trained_in = "bf16" if autocast_dtype(config.training.mixed_precision, device) else "float32"

    scored = len(tokens) - 1
    out = {
        "model": type(model).__name__,
        "device": str(device),
        "threads": args.threads,
        "datastore_tokens": len(store),
        "test_tokens": results["tokens"],
        "index": index.factory,
        "nprobe": config.index.nprobe,
        "fusion": config.fusion.to_dict(),
        "training": config.training.to_dict(),
        "results": {key: results[key] for key in ("base", "knn", "gnn", "gnn_knn")},
        "ratios": results["ratios"],  # each with its paired document-bootstrap interval
        "ratios_to_base_ppl": {
            key: results[key]["ppl"] / results["base"]["ppl"] for key in ("knn", "gnn", "gnn_knn")
        },
        "acceptance": {
            "gnn_below_base": results["gnn"]["ppl"] < results["base"]["ppl"],
            "gnn_knn_below_knn_below_base": (
                results["gnn_knn"]["ppl"] < results["knn"]["ppl"] < results["base"]["ppl"]
            ),
        },
        "speed": {
            "base_forward_tokens_per_s": scored / base_s,
            "gnn_forward_tokens_per_s": scored / gnn_s,
            "eval_ratio_gnn_over_base": base_s / gnn_s,
            "base_generate_tokens_per_s": base_gen_n / base_gen_s,
            "gnn_generate_tokens_per_s": gnn_gen_n / gnn_gen_s,
            "generate_ratio_gnn_over_base": (gnn_gen_n / gnn_gen_s) / (base_gen_n / base_gen_s),
            # The adapters' window side read from a table over the datastore (NeighbourStates,
            # the same logits), built once per trained adapter:
            "neighbour_states_build_seconds": states_build_s,
            "neighbour_states_mb": NeighbourStates.estimate_nbytes(lm.engine) / 2**20,
            "gnn_forward_with_states_tokens_per_s": scored / states_s,
            "eval_ratio_gnn_with_states_over_base": base_s / states_s,
            "gnn_generate_with_states_tokens_per_s": states_gen_n / states_gen_s,
            "generate_ratio_gnn_with_states_over_base": (
                (states_gen_n / states_gen_s) / (base_gen_n / base_gen_s)
            ),
            # Training as the config trains (mixed_precision, resolved here), over the float32
            # base forward that evaluations run; then each precision over its own base forward.
            "training_precision": trained_in,
            "adapter_training_tokens_per_s": train_tps,
            "training_ratio_over_base_forward": train_tps / (scored / base_s),
            "adapter_training_float32_tokens_per_s": train_fp32_tps,
            "training_ratio_float32_over_base_forward": train_fp32_tps / (scored / base_s),
            "base_forward_bf16_tokens_per_s": scored / base_bf16_s if base_bf16_s else None,
            "training_ratio_bf16_over_base_forward_bf16": (
                train_tps / (scored / base_bf16_s) if base_bf16_s and trained_in == "bf16" else None
            ),
            "training_step_ms_by_phase": phases,
        },
        "peak_memory_mb_after_stage": results.get("peak_memory_mb"),
        "pipeline_seconds": pipeline_s,
    }
    path = Path(__file__).parent / "results" / "gnnlm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(results_table(results, title=f"GNN-LM, {len(store):,}-token datastore"))
    print(json.dumps(out["speed"], indent=2))


if __name__ == "__main__":
    main()
