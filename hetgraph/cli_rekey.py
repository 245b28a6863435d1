"""``hetgraph datastore rekey``: the datastore keyed by an adapter's own features (the
parser and the command function; heavy imports inside the function, so parsing stays light).

The paper's GNN-LM + kNN searches keys made of GNN-LM's fused head states; hetgraph's default
searches the base model's. This command writes the former for every datastore row
(:func:`~hetgraph.fusion.rekey.rekey_datastore`) into ``ADAPTER/rekeyed`` (or ``--out``),
with a FAISS index over them; ``hetgraph eval --rekeyed DIR`` then adds the row
``gnn_knn_rekeyed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hetgraph.cli_kg import add_kg_options, open_knowledge
from hetgraph.cli_options import POSITIVE, at_least, index_config_from_args, thread_count

REKEY_EPILOG = """examples:
  hetgraph datastore rekey --datastore runs/ds --adapter runs/adapter   # runs/adapter/rekeyed
  hetgraph eval --datastore runs/ds --adapter runs/adapter --rekeyed runs/adapter/rekeyed"""


def add_rekey_command(datastore_subparsers: Any) -> None:
    """Register ``hetgraph datastore rekey`` on the ``datastore`` command's sub-parsers."""
    rekey = datastore_subparsers.add_parser(
        "rekey",
        help="key the datastore by an adapter's fused head states (the paper's GNN-LM + kNN)",
        epilog=REKEY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rekey.add_argument(
        "--datastore", required=True, help="the datastore the adapter was trained on"
    )
    rekey.add_argument(
        "--adapter",
        required=True,
        help="trained adapter directory (with decoder-layer sites the fused model runs over "
        "the stored tokens; head-only adapters need no base-model pass)",
    )
    rekey.add_argument("--out", default=None, help="output directory (default: ADAPTER/rekeyed)")
    rekey.add_argument("--model", default=None, help="the base model the datastore was built with")
    rekey.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if any)")
    rekey.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    rekey.add_argument("--threads", type=thread_count, default=None, help="torch and FAISS threads")
    rekey.add_argument(
        "--batch-rows", type=POSITIVE, default=256, help="datastore rows fused per call"
    )
    rekey.add_argument(
        "--chunk-rows",
        type=POSITIVE,
        default=16384,
        help="rows between two progress records (an interrupted run resumes from the last)",
    )
    rekey.add_argument(
        "--factory",
        default="auto",
        help="FAISS index_factory string of the new index, as hetgraph index build",
    )
    rekey.add_argument("--metric", choices=("l2", "ip"), default="l2")
    rekey.add_argument("--on-disk", dest="on_disk", action="store_const", const=True, default=None)
    rekey.add_argument("--in-memory", dest="on_disk", action="store_const", const=False)
    rekey.add_argument("--nprobe", type=POSITIVE, default=32, help="IVF lists per query")
    rekey.add_argument("--rerank", type=at_least(0), default=0, metavar="K_PRIME")
    rekey.add_argument("--shard-rows", type=POSITIVE, default=1_000_000)
    add_kg_options(rekey)  # --kg DIR: the knowledge graph a KG adapter was trained with
    rekey.set_defaults(func=cmd_datastore_rekey)


def check_rekey_inputs(store: Any, adapter: str | Path) -> None:
    """Refuse in one line, before loading the model, what can never be re-keyed: a datastore
    without its index or keyed at a decoder layer, an adapter trained on another datastore
    or through a relation encoder.

    Raises:
        RekeyError: naming the reason and the fix.
        AdapterFileError: ``adapter`` holds no readable adapter.
    """
    from hetgraph.fusion.persistence import read_adapter_config
    from hetgraph.fusion.rekey import RekeyError
    from hetgraph.io import INDEX_DIR, INDEX_FILE

    if not (Path(store.path) / INDEX_DIR / INDEX_FILE).is_file():
        raise RekeyError(
            f"{store.path} has no index (the adapter's neighbours are searched in it); run "
            f"`hetgraph index build --datastore {store.path}` first"
        )
    saved = read_adapter_config(adapter)
    trained_on = (saved.get("datastore") or {}).get("fingerprint")
    if trained_on != store.fingerprint:
        raise RekeyError(
            f"adapter {adapter} was trained on another datastore (fingerprint {trained_on}, "
            f"{store.path} has {store.fingerprint}); give the datastore it was trained on"
        )
    if saved.get("retrieval"):
        raise RekeyError(
            f"cannot re-key with adapter {adapter}: it retrieves through a relation encoder"
        )
    if store.key_layer is not None:
        raise RekeyError(
            f"cannot re-key {store.path}: its keys are decoder layer {store.key_layer}'s, "
            "not the LM-head input's (the queries re-keyed keys are searched with)"
        )


def cmd_datastore_rekey(args: argparse.Namespace) -> int:
    import torch

    from hetgraph.datastore import Datastore
    from hetgraph.fusion import HetGraphLM
    from hetgraph.fusion.rekey import REKEYED_DIR, rekey_datastore
    from hetgraph.index import DatastoreIndex
    from hetgraph.io import INDEX_DIR
    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import resolve_device, set_threads

    store = Datastore.open(args.datastore)
    check_rekey_inputs(store, args.adapter)  # before the model loads
    config = index_config_from_args(args)
    out = Path(args.out) if args.out else Path(args.adapter) / REKEYED_DIR
    device = resolve_device(args.device)
    set_threads(args.threads)
    model, tokenizer = load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    store = Datastore.open(args.datastore, model=model, tokenizer=tokenizer)
    index = DatastoreIndex.load(Path(args.datastore) / INDEX_DIR, store)
    knowledge = open_knowledge(args, tokenizer)
    lm = HetGraphLM.from_pretrained(
        args.adapter, model, store, index, tokenizer=tokenizer, knowledge=knowledge
    )
    rekeyed = rekey_datastore(
        lm,
        out,
        config,
        adapter_dir=args.adapter,
        batch_rows=args.batch_rows,
        chunk_rows=args.chunk_rows,
    )
    print(
        f"re-keyed {len(store)} rows with adapter {args.adapter}: {rekeyed.index} saved in "
        f"{out}; evaluate with: hetgraph eval --datastore {args.datastore} --adapter "
        f"{args.adapter} --rekeyed {out}"
    )
    return 0
