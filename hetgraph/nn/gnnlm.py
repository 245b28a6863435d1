r"""Official GNN-LM checkpoints: the ``HGT`` module of ShannonAI/GNN-LM
(``fairseq/models/hgt.py``) as a paper-mode :class:`~hetgraph.nn.GraphAdapter` and back.

The official module names are, for layer ``i``, node type ``t`` (``tgt`` = 0 is our
``ctx``, ``ntgt`` = 1 our ``nbr``) and relation ``r`` (``intra`` = 0: ``c2c`` and ``n2n``;
``inter`` = 1: ``n2c``)::

    gcs.{i}.{q,k,v,a}_linears.{t}.{weight,bias}    gcs.{i}.norms.{t}.{weight,bias}
    gcs.{i}.relation_pri [R, H]    gcs.{i}.relation_att / relation_msg [R, H, d, d]
    gcs.{i}.skip [2] (unused by the official forward)
    adapt_ws.{t}.{weight,bias} (only when in != hidden)    out.{weight,bias} (only when
    hidden != out)

Strip the fairseq prefix with ``prefix`` (e.g. ``"decoder.hgt_decoder."``).

The functions here read and write the parameters of an adapter they are given, so this
module does not import :class:`~hetgraph.nn.GraphAdapter` at run time;
:meth:`GraphAdapter.from_gnnlm_state_dict <hetgraph.nn.GraphAdapter.from_gnnlm_state_dict>`
builds one from :func:`gnnlm_adapter_config` and fills it with :func:`load_gnnlm_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.graph.config import CTX, NBR
from hetgraph.nn.config import AdapterConfig

if TYPE_CHECKING:
    from hetgraph.nn.adapter import GraphAdapter

#: Official node-type index of each of our node types.
NODE_TYPE_INDEX = {CTX: 0, NBR: 1}
#: Official relation index of each parameter set of a tied adapter.
RELATION_INDEX = {"intra": 0, "inter": 1}


class GNNLMStateDictError(HetgraphError):
    """A state dict does not hold an official GNN-LM ``HGT`` (names or shapes)."""


def _strip(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise GNNLMStateDictError(
            f"no key of the state dict starts with prefix {prefix!r}: pass the prefix of the "
            "HGT module (e.g. 'decoder.hgt_decoder.') or '' for a bare HGT state dict"
        )
    return out


def _infer_config(sd: dict[str, Tensor], overrides: dict[str, Any]) -> AdapterConfig:
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"gcs\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise GNNLMStateDictError(
            f"no consecutive 'gcs.<i>.' layers among the keys ({sorted(sd)[:4]} …): "
            "is this an official GNN-LM HGT state dict, and is the prefix right?"
        )
    # The tensors whose shapes give the widths (the adapt_ws / out maps are optional).
    dimensions = {
        "gcs.0.k_linears.0.weight": 2,
        "gcs.0.relation_att": 4,
        "adapt_ws.0.weight": 2,
        "out.weight": 2,
    }
    for name, dims in dimensions.items():
        if name not in sd and name.startswith("gcs."):
            raise GNNLMStateDictError(f"official GNN-LM state dict lacks {name!r}")
        if name in sd and sd[name].dim() != dims:
            raise GNNLMStateDictError(
                f"{name!r} has shape {tuple(sd[name].shape)}, expected {dims} dimensions"
            )
    hidden = sd["gcs.0.k_linears.0.weight"].shape[0]
    heads = sd["gcs.0.relation_att"].shape[1]
    width_in = sd["adapt_ws.0.weight"].shape[1] if "adapt_ws.0.weight" in sd else hidden
    width_out = sd["out.weight"].shape[0] if "out.weight" in sd else hidden
    return AdapterConfig.paper(
        **{
            "ctx_channels": width_in,
            "nbr_channels": width_in,
            "hidden_channels": hidden,
            "out_channels": width_out,
            "num_layers": len(layers),
            "heads": heads,
            **overrides,
        }
    )


def _layer_map(adapter: GraphAdapter) -> dict[str, Tensor]:
    """Official name -> our tensor, for every official parameter (views, not copies)."""
    names: dict[str, Tensor] = {}
    for i, conv in enumerate(adapter.convs):
        g = f"gcs.{i}."
        for node_type, t in NODE_TYPE_INDEX.items():
            qkv = conv.lin_qkv[node_type]
            for j, kind in enumerate("qkv"):
                rows = slice(j * conv.channels, (j + 1) * conv.channels)
                names[f"{g}{kind}_linears.{t}.weight"] = qkv.weight[rows]
                names[f"{g}{kind}_linears.{t}.bias"] = qkv.bias[rows]
            names[f"{g}a_linears.{t}.weight"] = conv.lin_out[node_type].weight
            names[f"{g}a_linears.{t}.bias"] = conv.lin_out[node_type].bias
            names[f"{g}norms.{t}.weight"] = conv.norm[node_type].weight
            names[f"{g}norms.{t}.bias"] = conv.norm[node_type].bias
    return names


def _check_paper(adapter: GraphAdapter) -> None:
    c = adapter.config
    wrong = [
        name
        for name, ok in (
            ("feed_forward=False", not c.feed_forward),
            ("token_channels=0", c.token_channels == 0),
            ("input_maps='official'", c.input_maps == "official"),
            ("output_map='official'", c.output_map == "official"),
            ("output_bias=True", c.output_bias),
            ("tie_intra=True", c.tie_intra),
            ("ctx_channels == nbr_channels", c.ctx_channels == c.nbr_channels),
        )
        if not ok
    ]
    if wrong:
        raise GNNLMStateDictError(
            "only a paper-mode adapter (AdapterConfig.paper()) has the official GNN-LM layout; "
            f"this one needs {', '.join(wrong)}"
        )


def adapter_to_gnnlm_state_dict(adapter: GraphAdapter, prefix: str = "") -> dict[str, Tensor]:
    """The weights of a paper-mode ``adapter`` under the official GNN-LM ``HGT`` names
    (detached copies; ``skip`` is written as ones, as the official module initialises it).

    Raises:
        GNNLMStateDictError: the adapter is not in paper mode (the option to change is named).
    """
    _check_paper(adapter)
    sd = {k: v.detach().clone() for k, v in _layer_map(adapter).items()}
    for i, conv in enumerate(adapter.convs):
        order = sorted(RELATION_INDEX, key=RELATION_INDEX.get)  # type: ignore[arg-type]
        for ours, theirs in (("rel_att", "att"), ("rel_msg", "msg"), ("rel_prior", "pri")):
            params = getattr(conv, ours)
            sd[f"gcs.{i}.relation_{theirs}"] = torch.stack(
                [params[name].detach() for name in order if name in params]
            )
        sd[f"gcs.{i}.skip"] = torch.ones(len(NODE_TYPE_INDEX), dtype=conv.param_dtype)
    for node_type, module in ((CTX, adapter.ctx_in), (NBR, adapter.nbr_in)):
        if isinstance(module, torch.nn.Sequential):
            t = NODE_TYPE_INDEX[node_type]
            sd[f"adapt_ws.{t}.weight"] = module[0].weight.detach().clone()
            sd[f"adapt_ws.{t}.bias"] = module[0].bias.detach().clone()
    if isinstance(adapter.out, torch.nn.Linear):
        sd["out.weight"] = adapter.out.weight.detach().clone()
        sd["out.bias"] = adapter.out.bias.detach().clone()
    return {prefix + k: v for k, v in sd.items()}


def gnnlm_adapter_config(
    state_dict: Mapping[str, Tensor], prefix: str = "", **overrides: Any
) -> AdapterConfig:
    """The paper-mode :class:`~hetgraph.nn.AdapterConfig` of an official GNN-LM ``HGT`` state
    dict: widths, layers and heads from the tensors' shapes, other fields from ``overrides``.

    Raises:
        GNNLMStateDictError: no key starts with ``prefix``, or the shapes are not an ``HGT``'s.
    """
    return _infer_config(_strip(state_dict, prefix), overrides)


def load_gnnlm_state_dict(
    adapter: GraphAdapter, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> GraphAdapter:
    """Copy an official GNN-LM ``HGT`` state dict into ``adapter`` (built with
    :func:`gnnlm_adapter_config` of it), which takes the state dict's dtype; return it.

    Raises:
        GNNLMStateDictError: a key is missing, unexpected or of the wrong shape.
    """
    sd = _strip(state_dict, prefix)
    dtype = sd["gcs.0.relation_att"].dtype
    adapter.to(dtype)
    targets = _layer_map(adapter)
    with torch.no_grad():
        for i, conv in enumerate(adapter.convs):
            for ours, theirs in (("rel_att", "att"), ("rel_msg", "msg"), ("rel_prior", "pri")):
                for name, r in RELATION_INDEX.items():
                    param = getattr(conv, ours)[name]
                    param.copy_(_take(sd, f"gcs.{i}.relation_{theirs}", r, param.shape))
    for node_type, module in ((CTX, adapter.ctx_in), (NBR, adapter.nbr_in)):
        if isinstance(module, torch.nn.Sequential):
            t = NODE_TYPE_INDEX[node_type]
            targets[f"adapt_ws.{t}.weight"] = module[0].weight
            targets[f"adapt_ws.{t}.bias"] = module[0].bias
    if isinstance(adapter.out, torch.nn.Linear):
        targets["out.weight"], targets["out.bias"] = adapter.out.weight, adapter.out.bias
    known = set(targets) | {
        f"gcs.{i}.{n}"
        for i in range(len(adapter.convs))
        for n in ("relation_att", "relation_msg", "relation_pri", "skip")
    }
    unexpected = sorted(set(sd) - known)
    if unexpected:
        raise GNNLMStateDictError(
            f"unexpected keys for an official GNN-LM HGT: {unexpected[:5]}"
            " (two-stream or extra node types are not supported)"
        )
    with torch.no_grad():
        for name, target in targets.items():
            if name not in sd:
                raise GNNLMStateDictError(f"official GNN-LM state dict lacks {prefix + name!r}")
            if sd[name].shape != target.shape:
                raise GNNLMStateDictError(
                    f"{prefix + name!r} has shape {tuple(sd[name].shape)},"
                    f" expected {tuple(target.shape)}"
                )
            target.copy_(sd[name])
    return adapter


def _take(sd: dict[str, Tensor], name: str, index: int, shape: torch.Size) -> Tensor:
    if name not in sd:
        raise GNNLMStateDictError(f"official GNN-LM state dict lacks {name!r}")
    stacked = sd[name]
    if stacked.dim() < 1 or stacked.shape[0] != len(RELATION_INDEX) or stacked.shape[1:] != shape:
        raise GNNLMStateDictError(
            f"{name!r} has shape {tuple(stacked.shape)}, expected "
            f"{(len(RELATION_INDEX), *shape)} (relations intra, inter)"
        )
    return stacked[index]
