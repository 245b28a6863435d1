"""Benchmark: vectorised context-graph build and the hetero attention layer (CPU).

1. Graph build for B=8, T=256, k=32, l=r=1: ``build_context_graph`` on the whole
   batch vs (a) a loop-based builder making one ``HeteroData`` per sequence and
   ``Batch.from_data_list`` (how GNN-LM's official code builds graphs), and
   (b) the vectorised builder called per sequence + ``Batch.from_data_list``.
2. One layer forward + backward at width 256, 8 heads on the same graph:
   ``HeteroGraphAttention`` (dense grid path and edge-list path) vs
   ``torch_geometric.nn.HGTConv``.

Writes benchmarks/results/graph_layer.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_geometric
from torch_geometric.data import Batch, HeteroData
from torch_geometric.nn import HGTConv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hetgraph.graph import CTX, N2C, N2N, NBR, GraphConfig, build_context_graph, context_graph_metadata
from hetgraph.nn import AdapterConfig, GraphAdapter, HeteroGraphAttention


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loop_graph(ids: np.ndarray, tokens: np.ndarray, docs: np.ndarray, l: int, r: int) -> HeteroData:
    """One sequence, built node by node with Python lists (the baseline)."""
    T, K = ids.shape
    N = len(docs)
    corpus_id, n2n, n2c = [], [], []
    for t in range(T):
        for o in ids[t].tolist():
            if o < 0:
                continue
            d = docs[o]
            nodes = {}
            for p in range(o - l, o + r + 1):
                if 0 <= p < N and docs[p] == d:
                    nodes[p] = len(corpus_id)
                    corpus_id.append(p)
            for p, n in nodes.items():
                n2n.append((n, n))
                if p + 1 in nodes:
                    n2n.append((n, nodes[p + 1]))
                    n2n.append((nodes[p + 1], n))
            n2c.append((nodes[o], t))
    g = HeteroData()
    g[CTX].num_nodes = T
    g[NBR].corpus_id = torch.tensor(corpus_id, dtype=torch.long)
    g[NBR].token_id = torch.from_numpy(tokens[corpus_id].astype(np.int64))
    g[NBR].num_nodes = len(corpus_id)
    g[N2N].edge_index = torch.tensor(n2n, dtype=torch.long).t().contiguous()
    g[N2C].edge_index = torch.tensor(n2c, dtype=torch.long).t().contiguous()
    g["ctx", "c2c", "ctx"].edge_index = torch.empty(2, 0, dtype=torch.long)
    return g


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--corpus", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layer-batch", type=int, default=1, help="sequences in the layer benchmark graph")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "graph_layer.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    B, T, K, N = args.batch, args.seq, args.k, args.corpus
    docs = torch.from_numpy(np.sort(np.random.default_rng(0).integers(0, N // 1000, N)).astype(np.int32))
    tokens = torch.randint(0, 50_000, (N,), dtype=torch.int32)
    ids = torch.randint(0, N, (B, T, K))
    ids[torch.rand(B, T, K) < 0.05] = -1
    cfg = GraphConfig(left=1, right=1)

    t_vec = timeit(lambda: build_context_graph(ids, tokens, docs, cfg), 3 * args.repeat)
    ids_np, tok_np, doc_np = ids.numpy(), tokens.numpy(), docs.numpy()
    t_loop = timeit(
        lambda: Batch.from_data_list([loop_graph(ids_np[b], tok_np, doc_np, 1, 1) for b in range(B)]),
        args.repeat,
    )
    t_per_seq = timeit(
        lambda: Batch.from_data_list([build_context_graph(ids[b : b + 1], tokens, docs, cfg) for b in range(B)]),
        args.repeat,
    )
    g = build_context_graph(ids, tokens, docs, cfg)
    loop_g = Batch.from_data_list([loop_graph(ids_np[b], tok_np, doc_np, 1, 1) for b in range(B)])
    assert loop_g[N2N].edge_index.size(1) == g[N2N].edge_index.size(1)
    assert torch.equal(loop_g[NBR].corpus_id, g[NBR].corpus_id)

    # ---- layer forward + backward on one graph
    F_, H = args.channels, args.heads
    lg = build_context_graph(ids[: args.layer_batch], tokens, docs, cfg)
    C, M = lg[CTX].num_nodes, lg[NBR].num_nodes
    metadata = context_graph_metadata(c2c=False)
    x_ctx = torch.randn(C, F_, requires_grad=True)
    x_nbr = torch.randn(M, F_, requires_grad=True)
    edge_index_dict = {N2N: lg[N2N].edge_index, N2C: lg[N2C].edge_index}
    ours = HeteroGraphAttention(F_, metadata, heads=H, normalization="joint")
    hgt = HGTConv(F_, F_, metadata, heads=H)
    W = int(lg.grid_w)
    grid_index = lg[NBR].grid_index
    mask = torch.zeros(C * K * W, dtype=torch.bool)
    mask[grid_index] = True
    mask = mask.view(C, K, W)

    def run_hgt():
        out = hgt({CTX: x_ctx, NBR: x_nbr}, edge_index_dict)
        (out[CTX].sum() + out[NBR].sum()).backward()

    def run_sparse():
        out = ours({CTX: x_ctx, NBR: x_nbr}, edge_index_dict)
        (out[CTX].sum() + out[NBR].sum()).backward()

    def run_dense():
        grid = x_nbr.new_zeros(C * K * W, F_).index_copy(0, grid_index, x_nbr).view(C, K, W, F_)
        out_c, out_n = ours.forward_grid(x_ctx, grid, mask, "center", int(lg.grid_center))
        (out_c.sum() + out_n.view(-1, F_)[grid_index].sum()).backward()

    with torch.no_grad():
        a = ours({CTX: x_ctx, NBR: x_nbr}, edge_index_dict)
        grid = x_nbr.new_zeros(C * K * W, F_).index_copy(0, grid_index, x_nbr).view(C, K, W, F_)
        b_c, b_n = ours.forward_grid(x_ctx, grid, mask, "center", int(lg.grid_center))
        max_diff = max(
            (a[CTX] - b_c).abs().max().item(), (a[NBR] - b_n.view(-1, F_)[grid_index]).abs().max().item()
        )
    t_hgt = timeit(run_hgt, args.repeat)
    t_sparse = timeit(run_sparse, args.repeat)
    t_dense = timeit(run_dense, args.repeat)

    # ---- full adapter (3 layers + feed-forward, eval-mode dropout off) on the same graph
    adapter = GraphAdapter(AdapterConfig(ctx_channels=F_, nbr_channels=F_, heads=H, dropout=0.0, attn_dropout=0.0))

    def run_adapter(path: str):
        adapter(lg, x_ctx, x_nbr, path=path).sum().backward()

    t_ad_sparse = timeit(lambda: run_adapter("sparse"), args.repeat)
    t_ad_dense = timeit(lambda: run_adapter("dense"), args.repeat)

    result = {
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "torch_geometric": torch_geometric.__version__,
        },
        "graph_build": {
            "B": B, "T": T, "k": K, "left": 1, "right": 1, "corpus_rows": N,
            "num_ctx": g[CTX].num_nodes, "num_nbr": g[NBR].num_nodes,
            "num_n2n_edges": g[N2N].edge_index.size(1), "num_n2c_edges": g[N2C].edge_index.size(1),
            "vectorised_s": t_vec,
            "loop_per_sequence_plus_batch_s": t_loop,
            "vectorised_per_sequence_plus_batch_s": t_per_seq,
            "speedup_vs_loop": t_loop / t_vec,
            "speedup_vs_per_sequence_batch": t_per_seq / t_vec,
        },
        "layer_fwd_bwd": {
            "B": args.layer_batch, "T": T, "k": K, "channels": F_, "heads": H,
            "num_ctx": C, "num_nbr": M,
            "num_edges": sum(e.size(1) for e in edge_index_dict.values()),
            "hgtconv_s": t_hgt,
            "ours_edge_list_s": t_sparse,
            "ours_dense_s": t_dense,
            "speedup_dense_vs_hgtconv": t_hgt / t_dense,
            "speedup_edge_list_vs_hgtconv": t_hgt / t_sparse,
            "speedup_dense_vs_edge_list": t_sparse / t_dense,
            "dense_vs_edge_list_max_abs_diff": max_diff,
        },
        "adapter_fwd_bwd": {
            "layers": 3, "hidden": F_, "heads": H, "feed_forward": True,
            "edge_list_s": t_ad_sparse,
            "dense_s": t_ad_dense,
            "speedup_dense_vs_edge_list": t_ad_sparse / t_ad_dense,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
