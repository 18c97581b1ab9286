"""Skulk's core: hook specs, the plugin manager, the node runtime, placement and the pipeline.

Plugins import only what this module exports.
"""

from skulk_core.backend import (
    Backend,
    BackendCapabilities,
    BlockingStepEngine,
    DrawingEngine,
    EmbeddingEngine,
    Engine,
    EngineOptions,
    PrefixCachingEngine,
    SequenceChunk,
    StageOutput,
    Tokenizer,
    best_kept,
    draw_outputs,
    shared_prefix,
    section_settings,
)
from skulk_core.config import Config, ConfigLoader, parse_size
from skulk_core.errors import (
    AuthenticationError,
    BackendError,
    ConfigError,
    DuplicateNameError,
    ModelError,
    PlacementError,
    PluginError,
    ProtocolError,
    RequestError,
    SkulkError,
    TransportError,
)
from skulk_core.hookspecs import hookimpl, hookspec
from skulk_core.http import HttpRequest, HttpResponse, error_body
from skulk_core.identity import NodeIdentity, node_id_for
from skulk_core.inference import (
    GenerationChunk,
    GenerationRequest,
    GeneratedToken,
    InstanceLostError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from skulk_core.model import DEFAULT_MODEL_ID, ModelCard, ModelFiles, ModelSource, default_model_path
from skulk_core.placement import (
    Accelerator,
    BackendSite,
    NodeResources,
    NodeView,
    Placement,
    PlacementPreview,
    PlacementRequest,
    ShardRange,
    StageAssignment,
)
from skulk_core.registry import (
    BackendRegistry,
    CommandRegistry,
    ConfigSectionRegistry,
    HttpRegistry,
    ServiceRegistry,
    TransportRegistry,
)
from skulk_core.storage import LocalModel, ModelResolver, ReadyFiles
from skulk_core.sampling import SampledToken, Sampler, SamplingParams, TokenLogprob, score_token
from skulk_core.telemetry import ClusterEvent, MetricSample, TraceSpan
from skulk_core.tensor import Tensor
from skulk_core.threads import EngineThread, compute_thread, run_on_own_thread
from skulk_core.transport import ByteStream, Connection, PeerAnnouncement, Transport, TransportContext

__version__ = "0.1.0"

__all__ = [
    "Accelerator", "AuthenticationError", "Backend", "BackendCapabilities", "BackendError", "BackendSite",
    "BackendRegistry", "BlockingStepEngine", "ByteStream", "ClusterEvent", "CommandRegistry", "Config", "ConfigError",
    "ConfigLoader", "ConfigSectionRegistry", "Connection", "DEFAULT_MODEL_ID", "DrawingEngine", "DuplicateNameError",
    "EmbeddingEngine", "Engine", "EngineThread", "PrefixCachingEngine", "GeneratedToken", "GenerationChunk", "GenerationRequest",
    "InstanceLostError", "ModelNotFoundError", "ModelNotReadyError", "SampledToken", "Sampler", "SamplingParams", "TokenLogprob", "score_token", "EngineOptions", "HttpRegistry", "HttpRequest", "HttpResponse", "LocalModel", "MetricSample",
    "ModelCard", "ModelError", "ModelFiles", "ModelResolver", "ModelSource", "NodeIdentity",
    "NodeResources", "NodeView", "PeerAnnouncement", "Placement", "PlacementError",
    "PlacementPreview", "PlacementRequest", "PluginError", "ProtocolError", "ReadyFiles",
    "RequestError", "SequenceChunk", "ServiceRegistry", "ShardRange", "SkulkError", "StageAssignment",
    "StageOutput", "Tensor", "Tokenizer", "TraceSpan", "Transport", "TransportContext",
    "TransportError", "TransportRegistry", "compute_thread", "default_model_path", "draw_outputs", "error_body", "hookimpl", "hookspec",
    "node_id_for", "run_on_own_thread", "section_settings", "shared_prefix", "best_kept",
]
