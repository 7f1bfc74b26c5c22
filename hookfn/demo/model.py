"""A minimal GPT-2-style decoder written in plain PyTorch.

The module tree mirrors Hugging Face's ``GPT2LMHeadModel`` so that hook
specifications written for GPT-2 carry over unchanged::

    transformer.wte              token embedding
    transformer.wpe              position embedding
    transformer.h.{i}            decoder block i
    transformer.h.{i}.ln_1       layer norm before attention
    transformer.h.{i}.attn       causal self-attention (returns a Tensor)
    transformer.h.{i}.attn.c_attn    fused query/key/value projection
    transformer.h.{i}.attn.c_proj    attention output projection
    transformer.h.{i}.ln_2       layer norm before the MLP
    transformer.h.{i}.mlp        feed-forward block
    transformer.h.{i}.mlp.c_fc   MLP input projection
    transformer.h.{i}.mlp.act    GELU non-linearity
    transformer.h.{i}.mlp.c_proj MLP output projection
    transformer.ln_f             final layer norm
    lm_head                      unembedding (tied to ``transformer.wte``)

Every module returns a plain ``torch.Tensor`` (no tuples, no output
dataclasses), and attention is written with explicit matrix products and a
softmax rather than ``scaled_dot_product_attention``, so forward-mode
automatic differentiation (``torch.func.jvp``) works through the whole model.
There is no dropout, so the model is deterministic in both train and eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLP", "Block", "CausalSelfAttention", "TinyGPT", "TinyGPTConfig", "Transformer"]


@dataclass(frozen=True)
class TinyGPTConfig:
    """Hyperparameters of a :class:`TinyGPT`.

    Attributes:
        vocab_size: Number of distinct tokens.
        n_layer: Number of decoder blocks.
        n_head: Number of attention heads per block.
        d_model: Width of the residual stream; must be divisible by ``n_head``.
        n_ctx: Maximum sequence length (number of learned positions).
        layer_norm_eps: Epsilon of every layer norm.
    """

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    n_ctx: int = 16
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        """Validate the configuration.

        Raises:
            ValueError: If a size is not positive or ``d_model`` is not a
                multiple of ``n_head``.
        """
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "n_ctx"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )

    @property
    def d_head(self) -> int:
        """Width of a single attention head."""
        return self.d_model // self.n_head


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Only the two projections are submodules; splitting into heads, the
    scaled dot products, the causal mask and the softmax are plain tensor
    operations inside :meth:`forward`.

    Args:
        config: Model hyperparameters.
    """

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.d_head = config.d_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally over the sequence.

        Args:
            x: Normalised residual stream, shape ``[batch, seq, d_model]``.

        Returns:
            The attention output, shape ``[batch, seq, d_model]``.
        """
        batch, seq, d_model = x.shape
        q, k, v = self.c_attn(x).split(d_model, dim=-1)
        # [batch, seq, d_model] -> [batch, n_head, seq, d_head]
        q = q.view(batch, seq, self.n_head, self.d_head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, self.d_head).transpose(1, 2)

        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        pattern = scores.softmax(dim=-1)

        z = (pattern @ v).transpose(1, 2).reshape(batch, seq, d_model)
        out: torch.Tensor = self.c_proj(z)
        return out


class MLP(nn.Module):
    """Position-wise feed-forward block with a 4x hidden expansion.

    Args:
        config: Model hyperparameters.
    """

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: Normalised residual stream, shape ``[batch, seq, d_model]``.

        Returns:
            The MLP output, shape ``[batch, seq, d_model]``.
        """
        out: torch.Tensor = self.c_proj(self.act(self.c_fc(x)))
        return out


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Args:
        config: Model hyperparameters.
    """

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the residual stream.

        Args:
            x: Residual stream, shape ``[batch, seq, d_model]``.

        Returns:
            The updated residual stream, same shape as ``x``.
        """
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """Embeddings, decoder blocks and final layer norm (GPT-2's ``transformer``).

    Args:
        config: Model hyperparameters.
    """

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Compute the final normalised residual stream.

        Args:
            input_ids: Token ids, shape ``[batch, seq]``.

        Returns:
            Hidden states after ``ln_f``, shape ``[batch, seq, d_model]``.
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x: torch.Tensor = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        out: torch.Tensor = self.ln_f(x)
        return out


class TinyGPT(nn.Module):
    """A small GPT-2-style language model.

    The unembedding ``lm_head`` has no bias and shares its weight with the
    token embedding ``transformer.wte``, as in GPT-2.

    Args:
        config: Model hyperparameters.

    Example:
        >>> model = TinyGPT(TinyGPTConfig(vocab_size=19))
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 19])
    """

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit layer norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Compute next-token logits.

        Args:
            input_ids: Token ids, a ``LongTensor`` of shape ``[batch, seq]``
                with ``seq <= config.n_ctx``.

        Returns:
            Logits of shape ``[batch, seq, vocab_size]``; position ``t`` only
            depends on tokens ``0..t``.

        Raises:
            ValueError: If ``input_ids`` is not two-dimensional or is longer
                than the context window.
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.n_ctx:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds n_ctx={self.config.n_ctx}"
            )
        logits: torch.Tensor = self.lm_head(self.transformer(input_ids))
        return logits
