"""(a) Build a datastore and its FAISS index from your own folder of text files.

Reads every text file under ``--corpus`` (recursively), splits the documents into
train / valid / test, runs the frozen LM over the train split once, and stores one key per
token (the LM-head input, fp16) with the token that followed it. Then builds the FAISS
index (``factory="auto"``: exact search below ~1M vectors) and runs one kNN search.

    python examples/01_build_datastore.py --tiny                  # seconds, tiny random model
    python examples/01_build_datastore.py --corpus ~/my_texts     # SmolLM2-135M on your text
"""

from __future__ import annotations

import _common
import numpy as np


def main() -> None:
    args = _common.parse(_common.parser(__doc__))
    model, tokenizer = _common.load(args)
    tokenized = _common.corpus(args, tokenizer)
    print(f"corpus: {tokenized}")
    store, index = _common.datastore_and_index(args, model, tokenizer, tokenized)
    print(f"datastore: {len(store)} entries of dim {store.dim} in {args.out}/datastore")
    print(f"index: {index}")

    # The first key of the store must find itself as its own nearest neighbour.
    query = np.asarray(store.keys[:1], dtype=np.float32)
    distances, ids = index.search(query, 4)
    print(
        f"nearest rows of row 0: {ids[0].tolist()} (distances {np.round(distances[0], 3).tolist()})"
    )
    print(
        f"row 0 is in document {store.document_name(0)!r}; next token "
        f"{tokenizer.decode([int(store.next_tokens[0])])!r}"
    )
    print("datastore OK")


if __name__ == "__main__":
    main()
