"""Hugging Face ``transformers`` backend: run a model's attention on the lab's kernel.

    import fa3_lab.hf
    fa3_lab.hf.register()                       # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fa3_lab", dtype=torch.bfloat16)

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` (the hook
transformers >= 4.48 offers for custom kernels) and the matching mask builder to
``AttentionMaskInterface`` (transformers >= 4.53, ``masking_utils``): the model then hands us
``attention_mask=None`` for an unpadded batch and the 2D padding mask otherwise, which we refuse.
Without that registration transformers would build no mask at all for an unknown backend, and a
padded batch would silently attend to its padding.

What the kernel covers, and what raises instead of silently computing something else:

* causal (decoder) or non-causal attention without a mask; GQA/MQA (k/v with fewer heads, never
  repeated); any ``scaling``; fp16/bf16 on an sm_90 GPU; headdim 64/128/256. Causal is bottom-right
  aligned, so decoding and chunked prefill with a dynamic KV cache are right too.
* NotImplementedError: a padding or custom mask, packed sequences, ``sliding_window`` or chunked
  attention, ``softcap``, attention sinks (``s_aux``), position bias, ``output_attentions=True``, a
  paged cache, a static cache (its unfilled slots need a mask).
* ValueError: ``dropout`` > 0 (the kernel has none: use ``model.eval()``).
* The checks of :func:`fa3_lab.flash_attn_func` (TypeError for an fp32 model or CPU tensors, …).

transformers is optional: importing this module does not import it; :func:`register` does.
"""
from __future__ import annotations

#: The name :func:`register` uses by default (``attn_implementation="fa3_lab"``).
NAME = "fa3_lab"

#: Keyword arguments some models pass that ask for something the kernel does not do.
_UNSUPPORTED_KWARGS = {
    "sliding_window": "sliding-window (local) attention",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
    "cache": "a paged KV cache",
}


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """An attention function for transformers' ``AttentionInterface``, calling :func:`fa3_lab.flash_attn_func`.

    Same signature and return as transformers' ``sdpa_attention_forward`` (integrations/sdpa_attention.py).

    Args:
        module: the calling attention layer; its ``is_causal`` (default True) is used unless
            ``is_causal`` is passed.
        query: (batch, nheads, seqlen_q, headdim) fp16/bf16 CUDA tensor (transformers' BHSD).
        key, value: (batch, nheads_kv, seqlen_k, headdim); nheads % nheads_kv == 0 (GQA, not repeated).
        attention_mask: must be None (no padding; the model's mask builder returns None then).
        dropout: must be 0.0.
        scaling: softmax scale α; None means 1/sqrt(headdim).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ignored, except the unsupported features listed in the module docstring.

    Returns:
        (attn_output, None): attn_output (batch, seqlen_q, nheads, headdim) contiguous, query's
        dtype; no attention weights (the kernel never forms P in memory).

    Raises:
        NotImplementedError: a mask, sliding window, softcap, sinks, position bias,
            output_attentions=True or a paged cache.
        ValueError: dropout > 0.
        TypeError, ValueError, RuntimeError: from :func:`fa3_lab.flash_attn_func`.

    Source: paper §3 forward (Alg. 1–2) behind transformers' attention interface.
    """
    from . import api

    if attention_mask is not None:
        raise NotImplementedError(
            f"attention_mask: the fa3_lab kernel supports no mask (causal or full attention only), got a mask of "
            f"shape {tuple(attention_mask.shape)} — a padded batch or a custom mask; run unpadded sequences "
            f"(batch of equal lengths, or batch 1) or use attn_implementation='sdpa'")
    if dropout:
        raise ValueError(f"dropout: expected 0.0 (the fa3_lab kernel has no dropout; call model.eval()), got {dropout}")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name}: {what} is not supported by the fa3_lab kernel (got {name}="
                                      f"{_short(kwargs[name])}); use attn_implementation='sdpa' or 'eager'")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("output_attentions: the fa3_lab kernel never materializes the attention "
                                  "weights P; use attn_implementation='eager' to get them")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    query, key, value = _autocast_inputs(query, key, value)
    # (b, h, s, d) -> (b, s, h, d): views, no copy; the kernel reads any batch/row/head strides.
    out = api.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              causal=bool(is_causal), softmax_scale=scaling)
    return out.contiguous(), None


def _autocast_inputs(query, key, value):
    """Under autocast, q, k, v in the autocast dtype, as SDPA gets them (it is on autocast's lower-precision
    list). Training with fp32 weights under bf16 autocast hands attention a float32 q and k: the rotary
    embedding multiplies the bf16 projections by float32 cos/sin. Outside autocast: unchanged (and a float32
    input still raises, naming q)."""
    import torch

    device = query.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in (torch.float16, torch.bfloat16):
            return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def _short(x) -> str:
    shape = getattr(x, "shape", None)
    return f"a tensor of shape {tuple(shape)}" if shape is not None else repr(x)


def mask_builder(*args, **kwargs):
    """The mask builder registered beside :func:`attention_forward` (transformers' ``AttentionMaskInterface``).

    transformers calls it while building a model's masks, with the pattern the layer wants
    (``mask_function``) and the 2D padding mask (``attention_mask``). Plain causal or bidirectional
    patterns go to transformers' own ``flash_attention_mask`` (None when nothing is padded, else the 2D
    mask, which :func:`attention_forward` refuses). Anything else — packed sequences, sliding window,
    chunked attention, a custom or/and pattern — cannot be expressed as the kernel's causal flag, so it
    raises here, before any compute. Arguments are passed through unchanged (their names changed in
    transformers 5.5: ``cache_position`` became ``q_length``/``q_offset``).

    Raises:
        NotImplementedError: ``mask_function`` is not transformers' causal or bidirectional pattern.
    """
    from transformers import masking_utils
    from transformers.masking_utils import causal_mask_function, flash_attention_mask

    plain = (causal_mask_function, getattr(masking_utils, "bidirectional_mask_function", causal_mask_function))
    mask_function = kwargs.get("mask_function", causal_mask_function)
    if not any(mask_function is f for f in plain):
        raise NotImplementedError(
            f"mask_function: the model asks for the attention pattern {getattr(mask_function, '__qualname__', mask_function)} "
            f"(packed sequences, sliding window, chunked or custom attention); the fa3_lab kernel does causal "
            f"or full attention only — use attn_implementation='sdpa'")
    return flash_attention_mask(*args, **kwargs)


def register(name: str = NAME) -> str:
    """Register :func:`attention_forward` as ``attn_implementation=name`` in transformers.

    Adds ``name`` to ``transformers.AttentionInterface`` (:func:`attention_forward`) and to
    ``transformers.masking_utils.AttentionMaskInterface`` (:func:`mask_builder`: None for an unpadded
    causal batch, the 2D padding mask otherwise, so a padded batch reaches :func:`attention_forward`
    and raises; other patterns raise at once). Calling it again is harmless.

    Args:
        name: the ``attn_implementation`` string, a non-empty str (default ``"fa3_lab"``).

    Returns:
        name.

    Raises:
        TypeError: ``name`` is not a non-empty str.
        fa3_lab._env.MissingExtra (an ImportError): transformers is not installed (the message names
            the ``test`` extra that installs it).
        RuntimeError: transformers is older than 4.53 (no ``masking_utils.AttentionMaskInterface``:
            older versions would hand us a 4D causal mask on every call).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    from . import _env

    transformers = _env.require("transformers", "test", "fa3_lab.hf.register")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, flash_attention_mask  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"fa3_lab.hf.register: needs transformers >= 4.53 (AttentionInterface and "
                           f"masking_utils.AttentionMaskInterface), found {transformers.__version__}") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_builder)
    return name


def is_registered(name: str = NAME) -> bool:
    """True if transformers' AttentionInterface maps ``name`` to :func:`attention_forward`."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    return AttentionInterface._global_mapping.get(name) is attention_forward
