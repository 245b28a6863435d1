"""(e) The context graph and the graph-attention layer on their own, without any LM.

A toy "corpus" of 20 tokens in two documents plays the datastore; a batch of 2 sequences
of 3 query positions each "retrieved" k = 2 corpus rows per position.
:func:`hetgraph.build_context_graph` turns that into a PyG ``HeteroData`` (``ctx`` nodes for
the queries, ``nbr`` nodes for the windows ``[o - l, o + r]`` around each retrieved row,
edge types ``n2n``, ``n2c`` and ``c2c``); random node features then go through one
:class:`hetgraph.HeteroGraphAttention` layer, which also returns its attention weights.

    python examples/05_graph_standalone.py          # no model, no corpus: always tiny
"""

from __future__ import annotations

import argparse

import torch

from hetgraph import GraphConfig, HeteroGraphAttention, build_context_graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tiny", action="store_true", help="accepted for symmetry: this example is always tiny"
    )
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    corpus_tokens = torch.arange(100, 120)  # token id of each datastore row
    corpus_doc_ids = torch.tensor([0] * 12 + [1] * 8)  # two documents: windows stop at the border
    neighbour_ids = torch.tensor(
        [  # [B=2, T=3, k=2]; -1 = no neighbour
            [[3, 11], [4, 12], [5, -1]],
            [[12, 19], [13, 0], [4, 5]],
        ]
    )
    config = GraphConfig(left=1, right=1, n2c="center", c2c=True)
    graph = build_context_graph(neighbour_ids, corpus_tokens, corpus_doc_ids, config)
    print(graph)
    print(f"metadata: {graph.metadata()}")
    print(
        f"{graph['ctx'].num_nodes} ctx nodes, {graph['nbr'].num_nodes} nbr nodes "
        f"(corpus rows {graph['nbr'].corpus_id.tolist()})"
    )

    # Node features: in GNN-LM these are the LM's hidden states (ctx) and the stored
    # datastore keys + token embeddings (nbr); any [num_nodes, channels] tensors will do here.
    x_dict = {
        "ctx": torch.randn(graph["ctx"].num_nodes, args.channels),
        "nbr": torch.randn(graph["nbr"].num_nodes, args.channels),
    }
    conv = HeteroGraphAttention(
        args.channels, graph.metadata(), heads=4, normalization="per_relation"
    ).eval()
    out, attention = conv(x_dict, graph.edge_index_dict, return_attention_weights=True)
    print(f"output shapes: { {t: tuple(v.shape) for t, v in out.items()} }")
    for edge_type, (edge_index, alpha) in attention.items():
        print(f"{'-'.join(edge_type)}: {edge_index.shape[1]} edges, attention {tuple(alpha.shape)}")
    # Per-relation normalisation: the attention into each ctx node sums to one per head.
    n2c_index, n2c_alpha = attention[("nbr", "n2c", "ctx")]
    sums = torch.zeros(graph["ctx"].num_nodes, conv.heads).index_add_(0, n2c_index[1], n2c_alpha)
    print(f"n2c attention sums per ctx node (head 0): {sums[:, 0].round(decimals=3).tolist()}")
    print("graph OK")


if __name__ == "__main__":
    main()
