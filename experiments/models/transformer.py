"""A small causal byte-level transformer language model (``byte-transformer``).

``ByteTransformer`` maps ``(batch, T)`` integer byte ids in ``[0, vocab_size)`` to
``(batch, T, vocab_size)`` next-byte logits: token embedding + learned position embedding
(both ``nn.Embed``), ``num_layers`` pre-LayerNorm blocks (causal multi-head self-attention,
then a GELU MLP of width ``mlp_ratio * width``, each with a residual connection), a final
LayerNorm and an untied ``Dense`` read-out. No dropout (the workload trains for less than
an epoch).

Every parameter is in a layer the library's ghost norms cover (``nn.Embed``,
``nn.DenseGeneral`` inside ``MultiHeadDotProductAttention``, ``nn.Dense``), except the
LayerNorms' scales and biases, which the ghost pass treats *directly* (one small per-example
copy each, exact); see ``docs/api.md``, "Ghost norms".
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    width: int
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        length = x.shape[-2]
        mask = nn.make_causal_mask(jnp.ones((x.shape[0], length), dtype=jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.width)(
            h, h, mask=mask
        )
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(self.mlp_ratio * self.width)(h))
        return x + nn.Dense(self.width)(h)


class ByteTransformer(nn.Module):
    """Causal transformer LM over bytes: ``(batch, T)`` ids -> ``(batch, T, vocab)`` logits.

    Attributes:
      vocab_size: number of token ids (256 for bytes); the logits' last axis.
      max_length: the longest sequence (size of the position embedding).
      width: d, the model width; ``num_heads`` must divide it.
      num_layers, num_heads, mlp_ratio: blocks, attention heads, MLP width / d.
    """

    vocab_size: int = 256
    max_length: int = 64
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        length = tokens.shape[-1]
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens > max_length {self.max_length}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} does not divide width {self.width}")
        x = nn.Embed(self.vocab_size, self.width, name="token_embed")(tokens)
        x = x + nn.Embed(self.max_length, self.width, name="position_embed")(jnp.arange(length))
        for i in range(self.num_layers):
            x = Block(self.width, self.num_heads, self.mlp_ratio, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(self.vocab_size, name="readout")(x)
