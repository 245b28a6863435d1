"""(f) GPU recipe: GNN-LM on DeepSeek-R1-Distill-Qwen-1.5B (Qwen2, d = 1536, 28 layers).

Prints the memory and datastore-size plan for the model, then runs the whole recipe:
datastore → index → adapter training → four-way evaluation → generation. On a GPU the
model runs in bf16 (the adapter trains in fp32; kNN probabilities are interpolated in
fp32). Without ``--model`` (no weights on this machine) the same code runs end to end on a
tiny randomly initialised Qwen2 config, so the recipe itself is tested in CI.

    python examples/06_gpu_recipe_qwen2_1p5b.py --tiny       # tiny Qwen2, CPU, seconds
    python examples/06_gpu_recipe_qwen2_1p5b.py \\
        --model ~/models/DeepSeek-R1-Distill-Qwen-1.5B --corpus ~/my_texts \\
        --max-tokens 5000000 --max-steps 2000 --out runs/r1-1p5b               # one GPU
"""

from __future__ import annotations

import _common
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from hetgraph import EvalConfig, HetGraphLM, load_model
from hetgraph.evaluation import evaluate_four_way, results_table
from hetgraph.index import auto_factory
from hetgraph.nn import AdapterConfig, GraphAdapter

#: The published config of DeepSeek-R1-Distill-Qwen-1.5B (nothing is downloaded).
R1_DISTILL_QWEN_1P5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
}

#: The recipe for the 1.5B model on one GPU (paper settings, adapter at the model width).
RECIPE = _common.Sizes(
    datastore_tokens=5_000_000,
    context_length=1024,
    stride=512,
    k=32,
    adapter={
        "hidden_channels": None,
        "num_layers": 3,
        "heads": 8,
        "dropout": 0.3,
        "attn_dropout": 0.1,
    },
    train_steps=2000,
    train_context=512,
    eval_tokens=100_000,
)

GB = 1e9


def memory_plan(
    config: Qwen2Config,
    tokens: int,
    k: int,
    left: int,
    right: int,
    adapter_layers: int,
    positions: int,
) -> None:
    """Print weights, datastore, index, adapter and graph-activation sizes for ``config``."""
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        d = config.hidden_size
        adapter = GraphAdapter(
            AdapterConfig(
                ctx_channels=d, nbr_channels=d, token_channels=d, num_layers=adapter_layers, heads=8
            )
        )
        adapter_params = sum(p.numel() for p in adapter.parameters()) + d  # + the gate
    window = left + right + 1
    print(
        f"  model: {params / 1e9:.2f} B parameters, d = {d}, {config.num_hidden_layers} layers; "
        f"bf16 weights {params * 2 / GB:.2f} GB"
    )
    print(
        f"  datastore of {tokens:,} tokens: fp16 keys {tokens * d * 2 / GB:.1f} GB "
        f"(N·d·2 bytes); next/token/doc ids {tokens * 12 / GB:.2f} GB; "
        f"each stored feature layer another {tokens * d * 2 / GB:.1f} GB"
    )
    print(
        f"  index: auto picks {auto_factory(tokens, d)!r}; 'OPQ64,IVF65536,PQ64' stores "
        f"64 B codes + 8 B ids per vector = {tokens * 72 / GB:.1f} GB"
    )
    print(
        f"  adapter ({adapter_layers} layers, hidden {d}): "
        f"{adapter_params / 1e6:.1f} M parameters; "
        f"fp32 + AdamW {adapter_params * 16 / GB:.2f} GB"
    )
    print(
        f"  graph: ≤ k·(l+r+1) = {k * window} nbr nodes per position; {positions} positions → "
        f"{positions * k * window:,} nodes, "
        f"{positions * k * window * d * 2 / GB:.2f} GB per bf16 "
        f"[nodes, d] activation (shared windows keep only distinct retrieved rows)"
    )


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=None, help="datastore tokens (recipe: 5M)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (recipe: 2000)")
    args = _common.parse(p)
    tiny = args.tiny or args.model is None
    if tiny and not args.tiny:
        print("no --model given: running the recipe on a tiny random Qwen2 config")
    args.tiny = tiny
    sizes = _common.TINY if tiny else RECIPE
    if args.max_tokens or args.max_steps:
        sizes = _common.Sizes(
            **{
                **vars(sizes),
                "datastore_tokens": args.max_tokens or sizes.datastore_tokens,
                "train_steps": args.max_steps or sizes.train_steps,
            }
        )
    args.sizes = sizes

    print("plan for DeepSeek-R1-Distill-Qwen-1.5B on one GPU, 100M-token datastore:")
    memory_plan(
        Qwen2Config(**R1_DISTILL_QWEN_1P5B),
        100_000_000,
        k=32,
        left=1,
        right=1,
        adapter_layers=3,
        positions=4 * 1024,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if tiny:
        from hetgraph.testing import byte_tokenizer, tiny_causal_lm

        model, tokenizer = tiny_causal_lm("qwen2").to(device=device, dtype=dtype), byte_tokenizer()
    else:
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    print(
        f"running on {device} in {dtype}: {type(model).__name__}, "
        f"d = {model.config.hidden_size}, {model.config.num_hidden_layers} layers"
    )

    tokenized = _common.corpus(args, tokenizer)
    store, index = _common.datastore_and_index(args, model, tokenizer, tokenized)
    print(f"datastore {len(store):,} × {store.dim}; {index}")
    fusion = _common.fusion_config(args)
    lm = HetGraphLM(model, store, index, fusion, tokenizer=tokenizer)
    _common.train(args, lm, tokenized, store)

    # How much do shared windows save on this text? Distinct retrieved rows vs k per position.
    ids = torch.as_tensor(
        tokenized.valid.tokens[: sizes.train_context], dtype=torch.long, device=device
    )[None]
    with torch.no_grad():
        neighbour_ids = lm(ids, output_retrieval=True).retrieval.neighbour_ids
    valid = neighbour_ids[neighbour_ids >= 0]
    print(
        f"shared windows: {valid.unique().numel():,} distinct rows for "
        f"{valid.numel():,} retrieved "
        f"({valid.unique().numel() / max(1, valid.numel()):.0%} of the per-neighbour nbr nodes)"
    )

    config = EvalConfig(
        context_length=sizes.context_length,
        stride=sizes.stride,
        batch_size=4,
        max_tokens=sizes.eval_tokens,
        k=sizes.k,
        valid_tokens=sizes.eval_tokens,
    )
    results = evaluate_four_way(lm, tokenized.valid, tokenized.test, config, show_progress=not tiny)
    title = "DeepSeek-R1-Distill-Qwen-1.5B recipe" if not tiny else "tiny Qwen2"
    print(results_table(results, title=title))

    prompt = tokenizer.decode(tokenized.test.tokens[:16].tolist())
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    out = lm.generate(
        **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    continuation = tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    print(f"generated: {continuation!r}")
    print("recipe OK")


if __name__ == "__main__":
    main()
