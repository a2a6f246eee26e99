"""nnjax: a functional neural-network library for JAX.

``import nnjax as nj``. A layer is ``nj.Layer(init, apply, name)``:
``init(key, x) -> (params, state)`` and
``apply(params, state, x, *, rng=None, train=False) -> (y, state)``, pure functions over
dicts of arrays whose leaves have readable paths (``blocks/3/attn/query/kernel``).
The documentation is in ``docs/`` (``docs/index.md``).

What a user calls, at the top level:

Layers:
    Dense, Conv, ConvTranspose, MaxPool, AvgPool, GlobalAvgPool, GlobalMaxPool,
    Flatten, Reshape, Dropout, BatchNorm, LayerNorm, RMSNorm, GroupNorm, Embedding,
    attend, tied_embedding, LearnedPositionalEmbedding, SinusoidalPositionalEmbedding,
    SimpleRNN, LSTM, GRU, Bidirectional, MultiHeadAttention, TransformerBlock.
Combinators:
    serial, fan_out, residual, repeat, unstack (a repeat's stacked params as one tree
    per layer), remat, by_platform; for transformer blocks
    pre_norm_block and on_hidden (the feed-forward block is nj.layers.MLP);
    keep_lengths (stack recurrent layers over a padded batch).
Writing and inspecting layers:
    Layer, as_layer, call_child, non_empty, output_shape, record_outputs, summary,
    count_params, param_bytes, param_shapes, leaf_paths; the types Params, State,
    Initializer.
Training:
    trainer (-> TrainerFunctions of init/step/evaluate/predict), TrainState, fit,
    early_stopping, evaluate, predict, ONEDNN_DOTS, release_host_memory (give the
    compiler's freed heap back to the OS; fit does after its first step).
Errors (all are NNJaxError):
    LayerError, ShapeError, ArgumentError, DataError, GlobError, MaskError,
    OptimizerStateError, CheckpointError, ShardingError, TrainingDiverged, BuildError.
Modules:
    nj.losses, nj.metrics, nj.data, nj.checkpoint, nj.finetune, nj.models, nj.post,
    nj.sharding, nj.paths (path globs), nj.layers (every layer and its helpers).
"""

from nnjax import checkpoint, data, finetune, layers, models, post, sharding
from nnjax.core import paths
from nnjax.core.combinators import (
    by_platform,
    fan_out,
    record_outputs,
    remat,
    repeat,
    residual,
    serial,
    unstack,
)
from nnjax.core.errors import (
    ArgumentError,
    BuildError,
    CheckpointError,
    DataError,
    GlobError,
    LayerError,
    MaskError,
    NNJaxError,
    OptimizerStateError,
    ShapeError,
    ShardingError,
    TrainingDiverged,
)
from nnjax.core.layer import (
    Initializer,
    Layer,
    Params,
    State,
    as_layer,
    call_child,
    non_empty,
    output_shape,
)
from nnjax.core.padded import keep_lengths
from nnjax.core.summary import count_params, leaf_paths, param_bytes, param_shapes, summary
from nnjax.layers import (
    GRU,
    LSTM,
    AvgPool,
    BatchNorm,
    Bidirectional,
    Conv,
    ConvTranspose,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    GroupNorm,
    LayerNorm,
    LearnedPositionalEmbedding,
    MaxPool,
    MultiHeadAttention,
    Reshape,
    RMSNorm,
    SimpleRNN,
    SinusoidalPositionalEmbedding,
    TransformerBlock,
    attend,
    on_hidden,
    pre_norm_block,
    tied_embedding,
)
from nnjax.training import losses, metrics
from nnjax.training.evaluate import evaluate, predict
from nnjax.training.fit import early_stopping, fit
from nnjax.training.host_memory import release_host_memory
from nnjax.training.trainer import ONEDNN_DOTS, TrainerFunctions, TrainState, trainer

__version__ = "0.1.0"

__all__ = [
    # layers
    "Dense",
    "Conv",
    "ConvTranspose",
    "MaxPool",
    "AvgPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Flatten",
    "Reshape",
    "Dropout",
    "BatchNorm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "Embedding",
    "attend",
    "tied_embedding",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
    "SimpleRNN",
    "LSTM",
    "GRU",
    "Bidirectional",
    "MultiHeadAttention",
    "TransformerBlock",
    # combinators
    "serial",
    "fan_out",
    "residual",
    "repeat",
    "unstack",
    "remat",
    "by_platform",
    "keep_lengths",
    "pre_norm_block",
    "on_hidden",
    # writing and inspecting layers
    "Layer",
    "as_layer",
    "call_child",
    "non_empty",
    "output_shape",
    "record_outputs",
    "summary",
    "count_params",
    "param_bytes",
    "param_shapes",
    "leaf_paths",
    "Params",
    "State",
    "Initializer",
    # training
    "trainer",
    "TrainerFunctions",
    "TrainState",
    "fit",
    "early_stopping",
    "evaluate",
    "predict",
    "ONEDNN_DOTS",
    "release_host_memory",
    # errors
    "NNJaxError",
    "LayerError",
    "ShapeError",
    "ArgumentError",
    "GlobError",
    "MaskError",
    "OptimizerStateError",
    "CheckpointError",
    "DataError",
    "TrainingDiverged",
    "ShardingError",
    "BuildError",
    # modules
    "losses",
    "metrics",
    "data",
    "checkpoint",
    "finetune",
    "models",
    "post",
    "sharding",
    "paths",
    "layers",
]
