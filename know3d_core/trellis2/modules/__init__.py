"""Building blocks of the TRELLIS.2 flow DiTs: attention, RoPE, norms, timestep embedder, blocks."""
from .attention import MultiHeadAttention, TokenLayout, attend
from .blocks import FeedForwardNet, ModulatedTransformerCrossBlock
from .embedder import TimestepEmbedder, timestep_embedding
from .norm import LayerNorm32, MultiHeadRMSNorm
from .rope import apply_rope, rope_frequencies, rope_phases

__all__ = [
    "MultiHeadAttention", "TokenLayout", "attend", "FeedForwardNet", "ModulatedTransformerCrossBlock",
    "TimestepEmbedder", "timestep_embedding", "LayerNorm32", "MultiHeadRMSNorm", "apply_rope",
    "rope_frequencies", "rope_phases",
]
