"""The window layout of a context graph: whether (and how) its ``nbr`` windows form a grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

#: ``"grid"``: one window per (query, neighbour slot); ``"shared"``: one window per distinct
#: retrieved row; ``"irregular"``: no window grid, only the edge-list path applies.
LayoutKind = Literal["grid", "shared", "irregular"]
#: Which window slots link to the query: the retrieved row only, or the whole window.
N2CMode = Literal["center", "window"]


@dataclass(frozen=True)
class WindowLayout:
    r"""How the ``nbr`` nodes of a :class:`~hetgraph.graph.ContextGraph` sit in
    windows of :math:`W` consecutive corpus rows, as read by the dense path of
    :class:`~hetgraph.nn.GraphAdapter` (see :func:`~hetgraph.nn.dense.dense_window_attention`).

    The scalars live here; the two per-node index tensors of a window grid live
    in the node stores, so that :meth:`~torch_geometric.data.HeteroData.to`,
    ``clone()`` and ``pin_memory()`` move them with the graph:

    * ``graph['nbr'].grid_index``: ``[num_nbr]`` int64, each node's flat slot
      ``window * W + offset`` in the ``[num_windows, W]`` grid;
    * ``graph['ctx'].nbr_window``: ``[num_ctx, k]`` int64, the window of each
      query's :math:`k`-th neighbour (``-1``: missing or dropped).

    Both are absent from ``"irregular"`` graphs. A graph from
    :meth:`~torch_geometric.data.Batch.from_data_list` is ``"irregular"`` (the
    index tensors are not offset by the batching), see :meth:`batched`.

    Args:
        kind: ``"grid"`` (``share_windows=False``, the official layout: window
            ``c * k + j`` belongs to neighbour slot ``j`` of query ``c``),
            ``"shared"`` (``share_windows=True``: one window per distinct
            retrieved row of the batch, shared by every query that retrieved
            it) or ``"irregular"`` (``deduplicate=True``, batched or edited
            graphs: no window grid).
        k: Neighbour slots per query (the retrieval's :math:`k`).
        window: Slots per window, :math:`W = l + r + 1`.
        center: Window slot of the retrieved row itself (:math:`l`).
        n2c: ``"center"`` (only the retrieved row links to its query) or
            ``"window"`` (every slot of the window does).
        num_windows: Windows of the grid (``num_ctx * k`` for ``"grid"``, the
            number of distinct retrieved rows for ``"shared"``, ``0`` for
            ``"irregular"``).
        c2c: Whether the ``c2c`` edges are exactly the causal edges of
            :func:`~hetgraph.graph.build_context_graph`: :math:`u \to v` for
            ``ctx`` nodes of one sequence (``batch_index``) with
            ``seq_index`` :math:`t_u \le t_v` (and :math:`t_v - t_u <`
            ``c2c_window``), so that the dense path computes them as masked
            attention per sequence
            (:func:`~hetgraph.nn.dense.dense_causal_window_attention`). A graph
            whose ``c2c`` edges are edited must clear it (or use
            :meth:`as_irregular`).
        c2c_window: The ``c2c_window`` of those edges (``None``: unlimited).
    """

    kind: LayoutKind
    k: int
    window: int
    center: int
    n2c: N2CMode
    num_windows: int = 0
    c2c: bool = False
    c2c_window: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("grid", "shared", "irregular"):
            raise ValueError(f"kind must be 'grid', 'shared' or 'irregular' (got {self.kind!r})")
        if self.n2c not in ("center", "window"):
            raise ValueError(f"n2c must be 'center' or 'window' (got {self.n2c!r})")
        if not 0 <= self.center < max(self.window, 1):
            raise ValueError(
                f"center ({self.center}) must be a slot of a {self.window}-slot window"
            )
        if self.kind == "irregular" and self.num_windows != 0:
            raise ValueError("an irregular layout has no windows (num_windows must be 0)")
        if self.c2c_window is not None and self.c2c_window < 1:
            raise ValueError(f"c2c_window must be >= 1 or None (got {self.c2c_window})")

    @property
    def is_dense(self) -> bool:
        """Whether the ``nbr`` nodes form a window grid (``"grid"`` or ``"shared"``)."""
        return self.kind != "irregular"

    @property
    def query_slots(self) -> tuple[int, ...]:
        """The window slots whose nodes link to the query (``n2c`` sources)."""
        return tuple(range(self.window)) if self.n2c == "window" else (self.center,)

    def as_irregular(self) -> WindowLayout:
        """This layout without its window grid, e.g. after re-numbering ``nbr`` nodes."""
        return dataclasses.replace(self, kind="irregular", num_windows=0)

    @classmethod
    def batched(cls, layouts: Sequence[WindowLayout]) -> WindowLayout:
        """The layout of a batch of graphs: ``"irregular"``, with the largest
        ``k`` (so that :func:`~hetgraph.graph.n2c_to_dense` still applies).

        Raises:
            ValueError: if the graphs' windows differ (``window``, ``center`` or ``n2c``).
        """
        if not layouts:
            raise ValueError("cannot batch zero layouts")
        first = layouts[0]
        if any(
            (x.window, x.center, x.n2c) != (first.window, first.center, first.n2c) for x in layouts
        ):
            raise ValueError("graphs with different windows (left/right/n2c) share no layout")
        return dataclasses.replace(first.as_irregular(), k=max(x.k for x in layouts))
