"""Draw the GNN-LM context graph figure of the docs (``context_graph.svg``).

Run ``python docs/figures/make_graph_figure.py``; the docs build also runs it when the
SVG is missing. Only matplotlib is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

CTX_COLOR, NBR_COLOR, CENTER_COLOR = "#4C72B0", "#DD8452", "#C44E52"


def node(ax, x, y, label, color, sub=None):
    ax.add_patch(plt.Circle((x, y), 0.28, color=color, zorder=3))
    ax.text(
        x, y, label, ha="center", va="center", color="white", fontsize=9, zorder=4, weight="bold"
    )
    if sub:
        ax.text(x, y - 0.45, sub, ha="center", va="top", fontsize=7, color="#333333")


def edge(ax, a, b, color, style="-", rad=0.0, both=False):
    arrow = FancyArrowPatch(
        a,
        b,
        arrowstyle="<|-|>" if both else "-|>",
        mutation_scale=9,
        color=color,
        linestyle=style,
        shrinkA=11,
        shrinkB=11,
        lw=1.1,
        connectionstyle=f"arc3,rad={rad}",
        zorder=2,
    )
    ax.add_patch(arrow)


def draw(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8.2, 4.4))
    ax.set_xlim(-0.8, 9.6)
    ax.set_ylim(-1.3, 4.6)
    ax.set_aspect("equal")
    ax.axis("off")

    # Query text: ctx nodes t-3 .. t (the LM's hidden states at the fused layer).
    ctx = {i: (1.2 + 1.6 * i, 0.0) for i in range(4)}
    words = ["def", "sort", "(", "key"]
    for i, (x, y) in ctx.items():
        node(ax, x, y, f"c{i}", CTX_COLOR, sub=f"“{words[i]}”")
    for i in range(3):
        edge(ax, ctx[i], ctx[i + 1], CTX_COLOR, style=":", rad=-0.3)
    ax.text(-0.7, 0.0, "ctx\n(query)", ha="left", va="center", fontsize=8, color=CTX_COLOR)

    # Two retrieved corpus positions o1, o2 of the last query; windows [o-1, o+1].
    windows = [
        (0.8, "list.sort(key", ["sort", "(", "key"]),
        (5.2, "sorted(x, key", ["x", ",", "key"]),
    ]
    for w, (x0, _, toks) in enumerate(windows):
        box = FancyBboxPatch(
            (x0 - 0.5, 2.35),
            3.8,
            1.3,
            boxstyle="round,pad=0.05",
            fc="#FFF4EC",
            ec=NBR_COLOR,
            lw=0.8,
            zorder=1,
        )
        ax.add_patch(box)
        ax.text(
            x0 + 1.4,
            3.85,
            f"window of retrieved row o{w + 1}: [o−l, o+r]",
            ha="center",
            fontsize=7.5,
            color=NBR_COLOR,
        )
        pts = [(x0 + 1.4 * j, 3.0) for j in range(3)]
        labels = ["o−1", "o", "o+1"]
        for j, p in enumerate(pts):
            node(ax, p[0], p[1], labels[j], CENTER_COLOR if j == 1 else NBR_COLOR)
            ax.text(p[0], 2.58, f"“{toks[j]}”", ha="center", va="top", fontsize=7, color="#333333")
        for j in range(2):
            edge(ax, pts[j], pts[j + 1], NBR_COLOR, both=True)
        edge(ax, pts[1], ctx[3], CENTER_COLOR, rad=0.15 if w == 0 else -0.05)
    ax.text(-0.7, 3.0, "nbr\n(corpus)", ha="left", va="center", fontsize=8, color=NBR_COLOR)

    handles = [
        plt.Line2D([], [], color=NBR_COLOR, label="n2n: adjacent window tokens (+ self-loops)"),
        plt.Line2D(
            [], [], color=CENTER_COLOR, label="n2c: retrieved row o → query (or whole window)"
        ),
        plt.Line2D([], [], color=CTX_COLOR, ls=":", label="c2c: causal u ≤ v (optional)"),
    ]
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(
        path,
        format=path.suffix.lstrip("."),
        metadata={"Date": None} if path.suffix == ".svg" else None,
    )
    plt.close(fig)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("context_graph.svg")
    print(draw(out))
