"""(d) Generate text with retrieval at every new position, and show the neighbours behind it.

:meth:`hetgraph.HetGraphLM.generate` is Hugging Face ``generate`` with the hooks attached
(the KV cache stays on; graphs are built for the new positions only).
:func:`hetgraph.inspection.describe_generation` then lists, for every generated token, the
corpus contexts retrieved for it: distance, adapter attention, document, context and the
token that followed it in the corpus.

    python examples/04_generate_with_neighbours.py --tiny
    python examples/04_generate_with_neighbours.py --prompt "The list.sort() method"
"""

from __future__ import annotations

import _common
import torch

from hetgraph.inspection import describe_generation


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--prompt", default=None, help="prompt (default: the start of a valid document)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--neighbours", type=int, default=3, help="contexts shown per generated token")
    args = _common.parse(p)
    model, tokenizer = _common.load(args)
    tokenized = _common.corpus(args, tokenizer)
    store, index = _common.datastore_and_index(args, model, tokenizer, tokenized)

    lm = _common.hetgraph_lm(args, model, tokenizer, store, index)

    prompt = args.prompt or tokenizer.decode(tokenized.valid.tokens[:24].tolist())
    max_new = args.max_new_tokens or (6 if args.tiny else 20)
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    generated = lm.generate(
        **inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    prompt_length = inputs["input_ids"].shape[1]
    print(f"prompt:    {prompt!r}")
    continuation = tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True)
    print(f"generated: {continuation!r}")
    print()
    with torch.no_grad():
        print(
            describe_generation(
                lm.model, lm.engine, tokenizer, generated[0], prompt_length, args.neighbours
            )
        )
    print("generation OK")


if __name__ == "__main__":
    main()
