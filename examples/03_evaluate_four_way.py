"""(c) Evaluate four ways on the same test tokens: base LM, kNN-LM, GNN-LM, GNN-LM + kNN.

Uses :func:`hetgraph.evaluation.evaluate_four_way`: the kNN-LM interpolation weight λ and
temperature are tuned on the valid split (separately for the base LM and for GNN-LM), and
GNN-LM reuses the base run's neighbours. Prints the results table and writes JSON + a plot.

    python examples/03_evaluate_four_way.py --tiny
    python examples/03_evaluate_four_way.py            # SmolLM2-135M on the Python docs
"""

from __future__ import annotations

import json
from pathlib import Path

import _common

from hetgraph import EvalConfig
from hetgraph.evaluation import evaluate_four_way, plot_results, results_table


def main() -> None:
    args = _common.parse(_common.parser(__doc__))
    s = _common.sizes(args)
    model, tokenizer = _common.load(args)
    tokenized = _common.corpus(args, tokenizer)
    store, index = _common.datastore_and_index(args, model, tokenizer, tokenized)

    lm = _common.hetgraph_lm(args, model, tokenizer, store, index)
    if not (Path(args.out) / "adapter" / "training.json").is_file():
        _common.train(args, lm, tokenized, store)  # no adapter from example 02 yet

    config = EvalConfig(
        context_length=s.context_length,
        stride=s.stride,
        batch_size=4,
        max_tokens=s.eval_tokens,
        k=s.k,
        valid_tokens=s.eval_tokens,
    )
    results = evaluate_four_way(
        lm, tokenized.valid, tokenized.test, config, show_progress=not args.tiny
    )
    print(results_table(results, title="four-way evaluation"))
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    plot_results(results, out / "results.png")
    print(f"results in {out / 'results.json'}, plot in {out / 'results.png'}")
    print("evaluation OK")


if __name__ == "__main__":
    main()
