"""Hugging Face transformers integration of the fused attention kernel.

``use_fused_attention(model)`` switches a transformers model from PyTorch's
scaled_dot_product_attention to ``torch.ops.pycompress.attention`` by setting its
config's ``_attn_implementation`` to ``"pycompress"``, an attention function
registered with transformers' ``AttentionInterface`` (and the sdpa mask builder
under the same name, so padding masks arrive as they do for sdpa).

The function computes what transformers' ``sdpa_attention_forward`` computes. Every
call the kernel cannot serve exactly goes to ``sdpa_attention_forward`` itself:
dropout > 0, autograd (an input requiring grad), non-float32 or non-CPU tensors,
grouped-query attention, a position bias, softcapping, ``output_attentions``, a head
mask, a mask that is neither bool nor float32 or does not broadcast, and tracing
with ``torch.jit``. transformers is imported only when this module's functions run,
so pycompress imports without it (use_fused_attention then switches nothing).
"""

from __future__ import annotations

import sys

import torch

from pycompress.ops.attention import attention, attention_cpu

ATTN_IMPLEMENTATION = "pycompress"
# Only models on the default sdpa path are switched: "eager" is kept when a user chose
# it (it returns attention weights), and flash/flex/paged kernels are left alone.
SWITCHABLE = ("sdpa",)


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _kernel_can_serve(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    if dropout > 0.0 or torch.jit.is_tracing():
        return False
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    if kwargs.get("head_mask") is not None or kwargs.get("output_attentions", False):
        return False
    if getattr(module, "num_key_value_groups", 1) > 1:
        return False
    tensors = (query, key, value) if attention_mask is None else (query, key, value, attention_mask)
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if any(t.dtype != torch.float32 or t.dim() != 4 for t in (query, key, value)):
        return False
    if query.shape[1] != key.shape[1] or key.shape[:3] != value.shape[:3] or query.shape[3] != key.shape[3]:
        return False
    if query.shape[0] != key.shape[0]:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return False
    if attention_mask is not None:
        if attention_mask.dtype not in (torch.bool, torch.float32) or attention_mask.dim() > 4:
            return False
        b, h, sq, sk = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        if any(m not in (1, t) for m, t in zip(reversed(attention_mask.shape), (sk, sq, h, b))):
            return False
    return True


def pycompress_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 is_causal=None, **kwargs):
    """transformers' attention-function signature; returns (attn_output [B, Sq, H, D], None)."""
    if not _kernel_can_serve(module, query, key, value, attention_mask, dropout, kwargs):
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    # The causality rule of sdpa_attention_forward: the module's flag, used only for a
    # prefill without an explicit mask (a given mask already encodes causality).
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    if type(query) is torch.Tensor and not torch.compiler.is_compiling():
        out = attention_cpu(query, key, value, attention_mask, is_causal, scaling)
    else:
        out = attention(query, key, value, attention_mask, is_causal, scaling)
    return out, None


def register() -> None:
    """Registers "pycompress" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, pycompress_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_fused_attention(model: torch.nn.Module) -> list[str]:
    """Routes a transformers model's attention to pycompress's fused CPU kernel.

    Switches every config in the model whose ``_attn_implementation`` is "sdpa" and
    whose model class dispatches through transformers' AttentionInterface. Returns the
    names of the attention modules now using it (modules holding a switched config and
    the ``is_causal`` flag every AttentionInterface attention module has), or of the
    owning models when no such module is found. A model that is not a transformers
    model, or is not on sdpa, is left unchanged and gives [] (also when transformers is
    not installed: then no module can be a transformers model), so convert can call it
    on any model.
    """
    if "transformers" not in sys.modules:
        # A transformers model cannot exist before its package is imported; importing it here
        # would cost every other model ~100 MiB of resident memory and a second of start-up.
        return []
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    register()
    switched: dict[int, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or not module._can_set_attn_implementation():
            continue
        config = module.config
        if id(config) not in switched and config._attn_implementation in SWITCHABLE:
            config._attn_implementation = ATTN_IMPLEMENTATION
            switched[id(config)] = name
    if not switched:
        return []
    attention_modules = [name for name, module in model.named_modules()
                         if not isinstance(module, PreTrainedModel) and hasattr(module, "is_causal")
                         and id(getattr(module, "config", None)) in switched]
    return attention_modules or sorted(switched.values())
