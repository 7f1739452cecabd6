"""Multi-head self-attention driven through a timm `Attention` module's own submodules.

One function serves the model's plain forward and every method, so they cannot drift apart.
Fused SDPA is the default path; attention probabilities are materialised only on request.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .state import Packing

POLICY_EPS = 1e-6


@dataclass
class AttentionInfo:
    """What a block's attention exposes to hooks. Fields are None unless asked for."""

    probs: Tensor | None = None  # (B, H, N, N) softmax probabilities
    keys: Tensor | None = None  # (B, H, N, head_dim) keys after k_norm


def _key_bias(key_mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Fold a key-padding mask and an additive bias into one (B, 1, 1, N) tensor, or None."""
    if key_mask is None:
        return bias
    mask = key_mask[:, None, None, :]
    if bias is None:
        return mask  # SDPA takes a boolean mask: True = attend
    return bias.masked_fill(~mask, float("-inf")).to(dtype)


def multihead_attention(
    attn: nn.Module,
    x: Tensor,
    *,
    key_mask: Tensor | None = None,
    bias: Tensor | None = None,
    policy: Tensor | None = None,
    need_probs: bool = False,
    need_keys: bool = False,
    packing: Packing | None = None,
    probs: Tensor | None = None,
) -> tuple[Tensor, AttentionInfo]:
    """Attention of a timm-layout module on (B, N, C) input, or on packed (T, C) real tokens.

    packing: `x` holds only the real tokens of a padded batch (see `state.Packing`); qkv and the
        output projection run on them, the attention product on the padded layout (B, N).

    key_mask: (B, N) bool, False marks padding keys nobody may attend to.
    bias: additive (B, 1, 1, N) logit bias (ToMe's proportional attention adds log sizes).
    policy: (B, N) keep mask in [0, 1] for training-mode pruning (DynamicViT's masked softmax):
        kept queries attend only to kept keys, and gradients reach the policy.
    probs: (B, H, N, N) attention a method supplies (MCTF's one-step-ahead attention, merged from the
        block's attention before its tokens were merged): only the values are computed here.
    """
    if probs is not None:
        return _given_attention(attn, x, probs), AttentionInfo(probs=probs)
    num_heads = attn.num_heads
    qkv = attn.qkv(x)
    dropout = attn.training and attn.attn_drop.p > 0  # the variable-length kernel has no attention dropout
    if packing is not None and bias is None and policy is None and not (need_probs or need_keys or dropout) and varlen_ready(qkv):
        return _varlen_attention(attn, qkv, packing), AttentionInfo()
    if packing is not None:
        qkv = packing.unpack(qkv)
    B, N, _ = qkv.shape
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    info = AttentionInfo(keys=k if need_keys else None)
    full_bias = _key_bias(key_mask, bias, q.dtype)

    if need_probs or policy is not None:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if full_bias is not None:
            logits = logits.masked_fill(~full_bias, float("-inf")) if full_bias.dtype == torch.bool else logits + full_bias
        # probabilities in float32 whatever the compute dtype: under bf16 / fp16 autocast the
        # masked softmax's eps terms (1e-6 / N) and small attention weights would underflow
        if policy is None:
            probs = logits.float().softmax(dim=-1)
        else:
            probs = _policy_softmax(logits.float(), policy)
        info.probs = probs
        out = attn.attn_drop(probs).to(v.dtype) @ v
    else:
        dropout_p = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full_bias, dropout_p=dropout_p)

    out = out.transpose(1, 2).reshape(B, N, num_heads * head_dim)
    if packing is not None:
        out = packing.pack(out)
    norm = getattr(attn, "norm", None)  # timm >= 1.0.x has an (Identity) norm before proj
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out)), info


def _qkv_rows(attn: nn.Module, x: Tensor, part: slice) -> Tensor:
    """Rows `part` of the block's own qkv projection (q, k: 0:2C; v: 2C:3C), so only what is needed runs."""
    bias = attn.qkv.bias
    return F.linear(x, attn.qkv.weight[part], None if bias is None else bias[part])


def attention_probs(attn: nn.Module, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """(B, H, N, N) float32 softmax(q k^T * scale + bias) of a block on (B, N, C) normed input, without values:
    the attention MCTF reads before the block merges its tokens (q/k-norm applied where the model has one)."""
    num_heads = attn.num_heads
    B, N, _ = x.shape
    width = attn.qkv.weight.shape[0] // 3
    q, k = _qkv_rows(attn, x, slice(0, 2 * width)).reshape(B, N, 2, num_heads, width // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1)


def _given_attention(attn: nn.Module, x: Tensor, probs: Tensor) -> Tensor:
    """Output projection of `probs` @ values: the values from the block's own v rows of qkv."""
    num_heads = attn.num_heads
    B, N, _ = x.shape
    width = attn.qkv.weight.shape[0] // 3
    v = _qkv_rows(attn, x, slice(2 * width, 3 * width)).reshape(B, N, num_heads, width // num_heads).transpose(1, 2)
    out = (attn.attn_drop(probs).to(v.dtype) @ v).transpose(1, 2).reshape(B, N, width)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out))


# -- packed variable-length attention (CUDA) -----------------------------------------------------
#: Use `torch.nn.attention.varlen.varlen_attn` (flash, CUDA, fp16 / bf16) for packed batches instead
#: of padding them for SDPA; `use_varlen(False)` turns it off (to compare the two).
VARLEN = {"enabled": True}


class use_varlen:
    """Context manager: packed attention through the variable-length kernel (True) or padded SDPA (False)."""

    def __init__(self, enabled: bool):
        self.enabled, self.saved = enabled, None

    def __enter__(self):
        self.saved, VARLEN["enabled"] = VARLEN["enabled"], self.enabled

    def __exit__(self, *exc):
        VARLEN["enabled"] = self.saved


def varlen_ready(qkv: Tensor) -> bool:
    """The variable-length flash kernel applies: CUDA, half precision, and this torch has it."""
    if not (VARLEN["enabled"] and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_attention(attn: nn.Module, qkv: Tensor, packing: Packing) -> Tensor:
    """Attention of packed (T, 3C) qkv rows, each image attending only to its own tokens; (T, C) after proj.

    No padded layout, no mask: the kernel reads each image's rows from the cumulative offsets.
    """
    from torch.nn.attention.varlen import varlen_attn

    num_heads = attn.num_heads
    T = qkv.shape[0]
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.reshape(T, 3, num_heads, head_dim).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cu = packing.cu_seqlens()
    q, k, v = (t.to(qkv.dtype).contiguous() for t in (q, k, v))
    out = varlen_attn(q, k, v, cu, cu, packing.width, packing.width, scale=attn.scale)
    out = out.reshape(T, num_heads * head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out))


def _policy_softmax(logits: Tensor, policy: Tensor) -> Tensor:
    """Softmax over kept keys only; a dropped token still attends to itself so its row stays finite."""
    N = logits.shape[-1]
    eye = torch.eye(N, dtype=logits.dtype, device=logits.device)
    keep = policy[:, None, None, :].to(logits.dtype)
    keep = keep + (1.0 - keep) * eye
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    weights = logits.exp() * keep
    return (weights + POLICY_EPS / N) / (weights.sum(dim=-1, keepdim=True) + POLICY_EPS)
