r"""The learned relation encoder: retrieval by a trained similarity instead of raw L2.

:class:`RelationEncoder` maps retrieval-site hidden states to unit vectors compared by inner
product; :func:`train_encoder` trains it contrastively from a datastore alone;
:func:`build_encoded_index` re-embeds the stored keys into an index in the encoder's
directory that :class:`EncodedIndex` loads and searches (refusing a mismatched datastore or
encoder).
"""

from hetgraph.encoder.config import ContrastiveConfig, EncoderConfig
from hetgraph.encoder.contrastive import EncoderTrainingResult, info_nce, train_encoder
from hetgraph.encoder.index import EncodedIndex, build_encoded_index
from hetgraph.encoder.model import EncoderError, RelationEncoder
from hetgraph.encoder.validation import validate_encoder

__all__ = [
    "ContrastiveConfig",
    "EncodedIndex",
    "EncoderConfig",
    "EncoderError",
    "EncoderTrainingResult",
    "RelationEncoder",
    "build_encoded_index",
    "info_nce",
    "train_encoder",
    "validate_encoder",
]
