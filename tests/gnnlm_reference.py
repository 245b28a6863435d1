"""An independent port of the official GNN-LM graph network and graph builder (test oracle).

Written from ShannonAI/GNN-LM (``fairseq/models/hgt.py`` ``HGTLayer`` / ``HGT``, and
``fairseq/data/token_block_dataset.py`` ``GraphTokenBlockDataset.new_build_graph`` /
``build_ntgt_edges`` / ``auto_regressive_edges``), not from hetgraph's code. Plain torch,
DGL semantics emulated with explicit Python loops (clarity over speed):

- ``edge_softmax(norm_by="dst")``: a softmax over the in-edges of each destination node,
  per edge type;
- ``update_all(u_mul_e, sum)``: zero for a node without in-edges of that type;
- ``multi_update_all(..., cross_reducer="mean")``: the mean over the *edge types* into the
  destination's node type; an edge type with no edge at all in the graph produces no frame
  (DGL's ``message_passing`` returns early), so it is left out of the mean.

The module names equal the official ones, so ``state_dict()`` has the official layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NTYPE2IDX = {"tgt": 0, "ntgt": 1}
ETYPE2IDX = {"intra": 0, "inter": 1}
#: The canonical edge types of TokenGraphTransformerDecoder.
CANONICAL_ETYPES = [("tgt", "intra", "tgt"), ("ntgt", "inter", "tgt"), ("ntgt", "intra", "ntgt")]


# ------------------------------------------------------------------------------ graph builder
@dataclass
class OfficialGraph:
    """A DGL-like heterograph: node counts, edges (src list, dst list) per canonical type,
    and the corpus offset of every ``ntgt`` node."""

    num_nodes: dict[str, int]
    edges: dict[tuple[str, str, str], tuple[list[int], list[int]]]
    ntgt_offsets: list[int] = field(default_factory=list)


def build_ntgt_edges(
    offsets2id: dict[int, int], context: int = 0, bidirect: bool = False
) -> tuple[list[int], list[int]]:
    """Nodes whose offsets differ by at most ``context`` are linked (the sorted sweep of the
    official code: every earlier-or-equal node of the range -> the newly added one, then
    the reverse direction of every non-self edge)."""
    nodes = sorted(((nid, off) for off, nid in offsets2id.items()), key=lambda x: x[1])
    src: list[int] = []
    dst: list[int] = []
    end = -1
    for start in range(len(nodes)):
        while end + 1 < len(nodes) and nodes[end + 1][1] <= nodes[start][1] + context:
            end += 1
            for s in range(start, end + 1):
                src.append(nodes[s][0])
                dst.append(nodes[end][0])
    if bidirect:
        for s, t in list(zip(src, dst, strict=True)):
            if s != t:
                src.append(t)
                dst.append(s)
    return src, dst


def build_block_graph(
    neighbour_ids: list[list[int]],
    query_offsets: list[int] | None,
    corpus_size: int,
    left: int,
    right: int,
    radius: int,
) -> OfficialGraph:
    """``new_build_graph`` for one block of ``T`` target positions.

    Args:
        neighbour_ids: ``[T][k]`` retrieved corpus offsets, ``-1`` for none.
        query_offsets: corpus offset of each target (training); ``None``: not in the corpus.
        corpus_size: number of corpus positions (windows are clipped at both ends only).
        left, right: neighbour context.
        radius: ``invalid_neighbor_context``; neighbours with ``|p - o| < radius`` are skipped.
    """
    T = len(neighbour_ids)
    tgt2ntgt: tuple[list[int], list[int]] = ([], [])
    ntgt2ntgt: tuple[list[int], list[int]] = ([], [])
    ntgt_offsets: list[int] = []
    for tgt_idx in range(T):
        for offset in neighbour_ids[tgt_idx]:
            if offset == -1:
                continue
            if query_offsets is not None and abs(query_offsets[tgt_idx] - offset) < radius:
                continue
            window = [offset]  # the centre first, linked to the target
            tgt2ntgt[0].append(tgt_idx)
            tgt2ntgt[1].append(len(ntgt_offsets))
            window += list(range(max(0, offset - left), offset))
            window += list(range(offset + 1, min(corpus_size, offset + 1 + right)))
            ids = list(range(len(ntgt_offsets), len(ntgt_offsets) + len(window)))
            ntgt_offsets += window
            s, d = build_ntgt_edges(dict(zip(window, ids, strict=True)), context=1, bidirect=True)
            ntgt2ntgt[0].extend(s)
            ntgt2ntgt[1].extend(d)
    # auto_regressive_edges: triu(ones(T, T)) -> (u, v) with u <= v, u the source.
    us, vs = torch.where(torch.triu(torch.ones(T, T, dtype=torch.bool)))
    return OfficialGraph(
        {"tgt": T, "ntgt": len(ntgt_offsets)},
        {
            ("tgt", "intra", "tgt"): (us.tolist(), vs.tolist()),
            ("ntgt", "inter", "tgt"): (tgt2ntgt[1], tgt2ntgt[0]),
            ("ntgt", "intra", "ntgt"): ntgt2ntgt,
        },
        ntgt_offsets,
    )


def batch_graphs(graphs: list[OfficialGraph]) -> OfficialGraph:
    """``dgl.batch``: the disjoint union, node ids offset per type."""
    out = OfficialGraph(dict.fromkeys(NTYPE2IDX, 0), {e: ([], []) for e in CANONICAL_ETYPES})
    for g in graphs:
        for (src_t, name, dst_t), (src, dst) in g.edges.items():
            out.edges[(src_t, name, dst_t)][0].extend(s + out.num_nodes[src_t] for s in src)
            out.edges[(src_t, name, dst_t)][1].extend(d + out.num_nodes[dst_t] for d in dst)
        for t in NTYPE2IDX:
            out.num_nodes[t] += g.num_nodes[t]
        out.ntgt_offsets += g.ntgt_offsets
    return out


# ------------------------------------------------------------------------------ graph network
class HGTLayer(nn.Module):
    """One official HGT layer (use_norm=True, two_stream=False), eval mode."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.d_k = n_heads, dim // n_heads
        num_types, num_rel = len(NTYPE2IDX), len(ETYPE2IDX)
        self.k_linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_types))
        self.q_linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_types))
        self.v_linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_types))
        self.a_linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_types))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_types))
        self.relation_pri = nn.Parameter(torch.ones(num_rel, n_heads))
        self.relation_att = nn.Parameter(torch.empty(num_rel, n_heads, self.d_k, self.d_k))
        self.relation_msg = nn.Parameter(torch.empty(num_rel, n_heads, self.d_k, self.d_k))
        self.skip = nn.Parameter(torch.ones(num_types))
        nn.init.xavier_uniform_(self.relation_att)
        nn.init.xavier_uniform_(self.relation_msg)

    def forward(self, g: OfficialGraph, h: dict[str, Tensor]) -> dict[str, Tensor]:
        H, D = self.n_heads, self.d_k
        k, q, v = {}, {}, {}
        for t, i in NTYPE2IDX.items():
            k[t] = self.k_linears[i](h[t]).view(-1, H, D)
            q[t] = self.q_linears[i](h[t]).view(-1, H, D)
            v[t] = self.v_linears[i](h[t]).view(-1, H, D)
        frames: dict[str, list[Tensor]] = {t: [] for t in NTYPE2IDX}
        for (src_t, name, dst_t), (src, dst) in g.edges.items():
            if not src:
                continue  # DGL: no message passing, no frame
            r = ETYPE2IDX[name]
            kr = torch.einsum("bij,ijk->bik", k[src_t], self.relation_att[r])
            vr = torch.einsum("bij,ijk->bik", v[src_t], self.relation_msg[r])
            pairs = zip(src, dst, strict=True)
            score = torch.stack([(q[dst_t][d] * kr[s]).sum(-1) for s, d in pairs])
            score = score * self.relation_pri[r] / math.sqrt(D)  # [E, H]
            agg = torch.zeros(g.num_nodes[dst_t], H, D, dtype=score.dtype)
            for node in range(g.num_nodes[dst_t]):
                edges = [e for e, d in enumerate(dst) if d == node]
                if not edges:
                    continue
                alpha = torch.softmax(score[edges], dim=0)  # [deg, H], per head
                for a, e in zip(alpha, edges, strict=True):
                    agg[node] = agg[node] + a[:, None] * vr[src[e]]
            frames[dst_t].append(agg)
        out = {}
        for t, i in NTYPE2IDX.items():
            if frames[t]:
                m = torch.stack(frames[t]).mean(0).reshape(g.num_nodes[t], H * D)
            else:  # (the official code needs a frame; only reachable with zero nodes here)
                assert g.num_nodes[t] == 0, f"no edge type with edges into {t}"
                m = h[t].new_zeros(0, H * D)
            out[t] = self.norms[i](self.a_linears[i](m) + h[t])
        return out


class HGT(nn.Module):
    """The official ``HGT``: ``adapt_ws`` (Linear + GELU) when in != hidden, the layers,
    ``out`` (Linear) when hidden != out."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int, n_heads: int
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.adapt_ws = nn.ModuleList()
        if in_dim != hidden_dim:
            self.adapt_ws.extend(nn.Linear(in_dim, hidden_dim) for _ in NTYPE2IDX)
        self.gcs = nn.ModuleList(HGTLayer(hidden_dim, n_heads) for _ in range(n_layers))
        if hidden_dim != out_dim:
            self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, g: OfficialGraph, features: dict[str, Tensor]) -> dict[str, Tensor]:
        h = {}
        for t, i in NTYPE2IDX.items():
            x = features[t]
            h[t] = F.gelu(self.adapt_ws[i](x)) if self.in_dim != self.hidden_dim else x
        for layer in self.gcs:
            h = layer(g, h)
        return {t: self.out(x) for t, x in h.items()} if self.hidden_dim != self.out_dim else h


def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    """Random values in every parameter (so that biases, norms and priors matter)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
