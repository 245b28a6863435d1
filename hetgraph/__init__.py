r"""hetgraph: GNN-LM for any Hugging Face decoder LM.

A frozen causal LM reads a corpus once into a FAISS datastore; for new text every
position retrieves its nearest corpus contexts; a heterogeneous context graph
(:class:`~torch_geometric.data.HeteroData`) of the original-context tokens and the
retrieved-neighbour tokens is aggregated by a graph-attention adapter; and the result
is added back into the decoder's hidden states through forward hooks
(`Meng et al., ICLR 2022 <https://arxiv.org/abs/2110.08743>`_).

The public API is re-exported here and imported lazily, so ``import hetgraph.graph``
or ``from hetgraph import HeteroGraphAttention`` does not pull in transformers or FAISS.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it, grouped by stage of the data flow.
_EXPORTS: dict[str, str] = {
    # corpus
    "CorpusConfig": "hetgraph.corpus",
    "CorpusError": "hetgraph.corpus",
    "Document": "hetgraph.corpus",
    "EMBEDDED_CORPUS": "hetgraph.corpus",
    "TokenizedCorpus": "hetgraph.corpus",
    "TokenizedSplit": "hetgraph.corpus",
    "read_documents": "hetgraph.corpus",
    "split_documents": "hetgraph.corpus",
    "tokenize_corpus": "hetgraph.corpus",
    "sliding_windows": "hetgraph.corpus.windows",
    # models
    "DEFAULT_MODEL": "hetgraph.models.loading",
    "ModelLoadError": "hetgraph.models.loading",
    "load_model": "hetgraph.models.loading",
    "decoder_layers": "hetgraph.models.layers",
    # datastore
    "Datastore": "hetgraph.datastore",
    "DatastoreConfig": "hetgraph.datastore",
    "DatastoreError": "hetgraph.datastore",
    "HiddenStateCapture": "hetgraph.datastore",
    "build_datastore": "hetgraph.datastore",
    # index
    "DatastoreIndex": "hetgraph.index",
    "IndexConfig": "hetgraph.index",
    "auto_factory": "hetgraph.index",
    # kNN-LM
    "interpolate_log_probs": "hetgraph.knnlm",
    "knn_log_probs": "hetgraph.knnlm",
    "knn_target_log_probs": "hetgraph.knnlm",
    "tune_knn": "hetgraph.knnlm",
    # graph
    "ContextGraph": "hetgraph.graph",
    "GraphConfig": "hetgraph.graph",
    "build_context_graph": "hetgraph.graph",
    "ctx_to_dense": "hetgraph.graph",
    # nn
    "AdapterConfig": "hetgraph.nn",
    "GraphAdapter": "hetgraph.nn",
    "HeteroGraphAttention": "hetgraph.nn",
    # fusion
    "AdapterMismatchError": "hetgraph.fusion",
    "FusionConfig": "hetgraph.fusion",
    "HetGraphLM": "hetgraph.fusion",
    "Retriever": "hetgraph.fusion",
    # training
    "TrainingConfig": "hetgraph.training",
    "TrainingResult": "hetgraph.training",
    "train_adapter": "hetgraph.training",
    # evaluation
    "EvalConfig": "hetgraph.evaluation",
    "collect_lm_outputs": "hetgraph.evaluation",
    "evaluate_base_knn": "hetgraph.evaluation",
    "evaluate_four_way": "hetgraph.evaluation",
    "model_perplexity": "hetgraph.evaluation",
    "plot_results": "hetgraph.evaluation",
    "results_table": "hetgraph.evaluation",
    # inspection
    "NeighbourReport": "hetgraph.inspection",
    "inspect_position": "hetgraph.inspection",
    "inspect_positions": "hetgraph.inspection",
    # the main job
    "RunConfig": "hetgraph.pipeline",
    "run_pipeline": "hetgraph.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hetgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
