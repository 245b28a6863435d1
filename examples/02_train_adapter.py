"""(b) Train a GNN-LM graph adapter on top of a frozen LM.

Wraps the frozen model in :class:`hetgraph.HetGraphLM` (forward hooks; each fused site
gets an adapter and a gate initialised to zero, so the untrained model is exactly the
base model), checks that identity, trains only the adapter on the datastore's own text
(the leakage filter hides each position's own neighbourhood), and saves it.

    python examples/02_train_adapter.py --tiny
    python examples/02_train_adapter.py --corpus ~/my_texts --model ~/models/my-lm
"""

from __future__ import annotations

import _common
import torch

from hetgraph import HetGraphLM


def main() -> None:
    args = _common.parse(_common.parser(__doc__))
    model, tokenizer = _common.load(args)
    tokenized = _common.corpus(args, tokenizer)
    store, index = _common.datastore_and_index(args, model, tokenizer, tokenized)

    lm = HetGraphLM(model, store, index, _common.fusion_config(args), tokenizer=tokenizer)
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    print(
        f"adapter sites {lm.engine.fusion_sites}, {trainable:,} trainable parameters; "
        "base model frozen"
    )

    # Gates start at zero: with the hooks attached the logits are exactly the base model's.
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokenized.valid.tokens[:64], dtype=torch.long, device=device)[None]
    with torch.no_grad():
        base = model(ids).logits
        fused = lm(ids).logits
    print(
        f"untrained adapter changes the logits by {(fused - base).abs().max().item():.1e} "
        "(exact identity)"
    )

    adapter_dir = _common.train(args, lm, tokenized, store)
    gate = max(g.abs().max().item() for g in lm.engine.gates.values())
    print(f"largest gate after training: {gate:.2e}; adapter saved in {adapter_dir}")
    print("training OK")


if __name__ == "__main__":
    main()
