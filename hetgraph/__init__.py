r"""hetgraph: GNN-LM for any Hugging Face decoder LM.

A frozen causal LM reads a corpus once into a FAISS datastore; for new text every
position retrieves its nearest corpus contexts; a heterogeneous context graph
(:class:`~torch_geometric.data.HeteroData`) of the original-context tokens and the
retrieved-neighbour tokens is aggregated by a graph-attention adapter; and the result
is added back into the decoder's hidden states through forward hooks
(`Meng et al., ICLR 2022 <https://arxiv.org/abs/2110.08743>`_).

The public API is re-exported here and imported lazily, so ``import hetgraph.graph``
or ``from hetgraph import HeteroGraphAttention`` loads neither FAISS nor the datastore and
fusion stages;
the ``TYPE_CHECKING`` block lists the same names eagerly for type checkers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it, grouped by stage of the data flow.
_EXPORTS: dict[str, str] = {
    # configuration and errors
    "ConfigError": "hetgraph.configuration",
    "HetgraphError": "hetgraph.errors",
    "LockError": "hetgraph.locking",
    "directory_lock": "hetgraph.locking",
    "VerificationError": "hetgraph.verify",
    "VerificationReport": "hetgraph.verify",
    "verify": "hetgraph.verify",
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
    "CustomCodeError": "hetgraph.models.errors",
    "ModelLoadError": "hetgraph.models.errors",
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
    "build_ondisk_index": "hetgraph.index",
    # relation encoder (learned retrieval)
    "ContrastiveConfig": "hetgraph.encoder",
    "EncodedIndex": "hetgraph.encoder",
    "EncoderConfig": "hetgraph.encoder",
    "EncoderError": "hetgraph.encoder",
    "RelationEncoder": "hetgraph.encoder",
    "build_encoded_index": "hetgraph.encoder",
    "train_encoder": "hetgraph.encoder",
    # kNN-LM
    "interpolate_log_probs": "hetgraph.knnlm",
    "knn_log_probs": "hetgraph.knnlm",
    "knn_target_log_probs": "hetgraph.knnlm",
    "tune_knn": "hetgraph.knnlm",
    # graph
    "ContextGraph": "hetgraph.graph",
    "GraphConfig": "hetgraph.graph",
    "KGGraphConfig": "hetgraph.graph",
    "build_context_graph": "hetgraph.graph",
    "WindowLayout": "hetgraph.graph",
    "ctx_to_dense": "hetgraph.graph",
    # nn
    "AdapterConfig": "hetgraph.nn",
    "GraphAdapter": "hetgraph.nn",
    "GNNLMStateDictError": "hetgraph.nn",
    "HeteroGraphAttention": "hetgraph.nn",
    "KGFactEncoder": "hetgraph.nn",
    # fusion
    "AdapterMismatchError": "hetgraph.fusion",
    "FusionConfig": "hetgraph.fusion",
    "FusionEngine": "hetgraph.fusion",
    "RekeyError": "hetgraph.fusion.rekey",
    "RekeyedIndex": "hetgraph.fusion.rekey",
    "rekey_datastore": "hetgraph.fusion.rekey",
    "GraphInputBuilder": "hetgraph.fusion",
    "HetGraphLM": "hetgraph.fusion",
    "NeighbourStates": "hetgraph.fusion",
    "Retrieval": "hetgraph.fusion",
    "Retriever": "hetgraph.fusion",
    "RetrievalGate": "hetgraph.fusion",
    "resolve_fusion_sites": "hetgraph.fusion",
    # training
    "TrainingConfig": "hetgraph.training",
    "TrainingError": "hetgraph.training.trainer",
    "InitAdapterError": "hetgraph.training",
    "TrainingResult": "hetgraph.training",
    "train_adapter": "hetgraph.training",
    # evaluation
    "EvalConfig": "hetgraph.evaluation",
    "NonFiniteError": "hetgraph.evaluation",
    "NeighbourSearch": "hetgraph.evaluation",
    "TrimmedForward": "hetgraph.evaluation",
    "gnn_forward": "hetgraph.evaluation",
    "collect_lm_outputs": "hetgraph.evaluation",
    "evaluate_base_knn": "hetgraph.evaluation",
    "evaluate_four_way": "hetgraph.evaluation",
    "EvaluationResults": "hetgraph.evaluation",
    "MethodScore": "hetgraph.evaluation",
    "PerTokenResults": "hetgraph.evaluation",
    "paired_ratio": "hetgraph.evaluation",
    "read_per_token": "hetgraph.evaluation",
    "BootstrapSpec": "hetgraph.evaluation",
    "perplexity_intervals": "hetgraph.evaluation",
    "stratified_segments": "hetgraph.evaluation",
    "write_per_token": "hetgraph.evaluation",
    "model_perplexity": "hetgraph.evaluation",
    "plot_results": "hetgraph.evaluation",
    "results_table": "hetgraph.evaluation",
    # inspection
    "NeighbourReport": "hetgraph.inspection",
    "inspect_position": "hetgraph.inspection",
    "inspect_positions": "hetgraph.inspection",
    # knowledge graph
    "KnowledgeGraph": "hetgraph.kg",
    "KnowledgeGraphError": "hetgraph.kg",
    "AliasConfig": "hetgraph.kg",
    "EntityLinker": "hetgraph.kg",
    "EntityLinks": "hetgraph.kg",
    "EmbeddingConfig": "hetgraph.kg",
    "embed_knowledge_graph": "hetgraph.kg",
    "load_entity_features": "hetgraph.kg",
    "load_kge_embeddings": "hetgraph.kg",
    "FactIndex": "hetgraph.kg",
    "add_facts": "hetgraph.kg",
    "KnowledgeConfig": "hetgraph.kg",
    "KnowledgeSource": "hetgraph.kg",
    # the main job
    "ProvenanceError": "hetgraph.pipeline",
    "RunConfig": "hetgraph.pipeline",
    "run_pipeline": "hetgraph.pipeline",
}

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from hetgraph.configuration import (
        ConfigError as ConfigError,
    )
    from hetgraph.corpus import (
        EMBEDDED_CORPUS as EMBEDDED_CORPUS,
        CorpusConfig as CorpusConfig,
        CorpusError as CorpusError,
        Document as Document,
        TokenizedCorpus as TokenizedCorpus,
        TokenizedSplit as TokenizedSplit,
        read_documents as read_documents,
        split_documents as split_documents,
        tokenize_corpus as tokenize_corpus,
    )
    from hetgraph.corpus.windows import (
        sliding_windows as sliding_windows,
    )
    from hetgraph.datastore import (
        Datastore as Datastore,
        DatastoreConfig as DatastoreConfig,
        DatastoreError as DatastoreError,
        HiddenStateCapture as HiddenStateCapture,
        build_datastore as build_datastore,
    )
    from hetgraph.encoder import (
        ContrastiveConfig as ContrastiveConfig,
        EncodedIndex as EncodedIndex,
        EncoderConfig as EncoderConfig,
        EncoderError as EncoderError,
        RelationEncoder as RelationEncoder,
        build_encoded_index as build_encoded_index,
        train_encoder as train_encoder,
    )
    from hetgraph.errors import (
        HetgraphError as HetgraphError,
    )
    from hetgraph.evaluation import (
        BootstrapSpec as BootstrapSpec,
        EvalConfig as EvalConfig,
        EvaluationResults as EvaluationResults,
        MethodScore as MethodScore,
        NeighbourSearch as NeighbourSearch,
        NonFiniteError as NonFiniteError,
        PerTokenResults as PerTokenResults,
        TrimmedForward as TrimmedForward,
        collect_lm_outputs as collect_lm_outputs,
        evaluate_base_knn as evaluate_base_knn,
        evaluate_four_way as evaluate_four_way,
        gnn_forward as gnn_forward,
        model_perplexity as model_perplexity,
        paired_ratio as paired_ratio,
        perplexity_intervals as perplexity_intervals,
        plot_results as plot_results,
        read_per_token as read_per_token,
        results_table as results_table,
        stratified_segments as stratified_segments,
        write_per_token as write_per_token,
    )
    from hetgraph.fusion import (
        AdapterMismatchError as AdapterMismatchError,
        FusionConfig as FusionConfig,
        FusionEngine as FusionEngine,
        GraphInputBuilder as GraphInputBuilder,
        HetGraphLM as HetGraphLM,
        NeighbourStates as NeighbourStates,
        Retrieval as Retrieval,
        RetrievalGate as RetrievalGate,
        Retriever as Retriever,
        resolve_fusion_sites as resolve_fusion_sites,
    )
    from hetgraph.fusion.rekey import (
        RekeyedIndex as RekeyedIndex,
        RekeyError as RekeyError,
        rekey_datastore as rekey_datastore,
    )
    from hetgraph.graph import (
        ContextGraph as ContextGraph,
        GraphConfig as GraphConfig,
        KGGraphConfig as KGGraphConfig,
        WindowLayout as WindowLayout,
        build_context_graph as build_context_graph,
        ctx_to_dense as ctx_to_dense,
    )
    from hetgraph.index import (
        DatastoreIndex as DatastoreIndex,
        IndexConfig as IndexConfig,
        auto_factory as auto_factory,
        build_ondisk_index as build_ondisk_index,
    )
    from hetgraph.inspection import (
        NeighbourReport as NeighbourReport,
        inspect_position as inspect_position,
        inspect_positions as inspect_positions,
    )
    from hetgraph.kg import (
        AliasConfig as AliasConfig,
        EmbeddingConfig as EmbeddingConfig,
        EntityLinker as EntityLinker,
        EntityLinks as EntityLinks,
        FactIndex as FactIndex,
        KnowledgeConfig as KnowledgeConfig,
        KnowledgeGraph as KnowledgeGraph,
        KnowledgeGraphError as KnowledgeGraphError,
        KnowledgeSource as KnowledgeSource,
        add_facts as add_facts,
        embed_knowledge_graph as embed_knowledge_graph,
        load_entity_features as load_entity_features,
        load_kge_embeddings as load_kge_embeddings,
    )
    from hetgraph.knnlm import (
        interpolate_log_probs as interpolate_log_probs,
        knn_log_probs as knn_log_probs,
        knn_target_log_probs as knn_target_log_probs,
        tune_knn as tune_knn,
    )
    from hetgraph.locking import (
        LockError as LockError,
        directory_lock as directory_lock,
    )
    from hetgraph.models.errors import (
        CustomCodeError as CustomCodeError,
        ModelLoadError as ModelLoadError,
    )
    from hetgraph.models.layers import (
        decoder_layers as decoder_layers,
    )
    from hetgraph.models.loading import (
        DEFAULT_MODEL as DEFAULT_MODEL,
        load_model as load_model,
    )
    from hetgraph.nn import (
        AdapterConfig as AdapterConfig,
        GNNLMStateDictError as GNNLMStateDictError,
        GraphAdapter as GraphAdapter,
        HeteroGraphAttention as HeteroGraphAttention,
        KGFactEncoder as KGFactEncoder,
    )
    from hetgraph.pipeline import (
        ProvenanceError as ProvenanceError,
        RunConfig as RunConfig,
        run_pipeline as run_pipeline,
    )
    from hetgraph.training import (
        InitAdapterError as InitAdapterError,
        TrainingConfig as TrainingConfig,
        TrainingResult as TrainingResult,
        train_adapter as train_adapter,
    )
    from hetgraph.training.trainer import (
        TrainingError as TrainingError,
    )
    from hetgraph.verify import (
        VerificationError as VerificationError,
        VerificationReport as VerificationReport,
        verify as verify,
    )

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
