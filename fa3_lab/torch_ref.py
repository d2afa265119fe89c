"""Standard attention in PyTorch on the GPU: the float32 reference and the same-precision emulation.

FA3's tolerance rule (hopper/test_flash_attn.py) compares a kernel's error with the error of a
"same-precision" implementation: standard attention run in the input dtype. Both are here so that the
tests, the tour and the notebooks use one definition.
"""
from __future__ import annotations


def attention_ref(q, k, v, causal, scale, upcast=True):
    """Standard attention of BSHD tensors; returns (out, lse).

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim).
        causal: bottom-right aligned mask.  scale: softmax scale α.
        upcast: True → computed in float32 (the reference); False → in the input dtype (the
            emulation: matmuls round to the input dtype, softmax in float32 then rounded).

    Returns:
        out (batch, seqlen_q, nheads, headdim) float32 or input dtype; lse (batch, nheads, seqlen_q)
        float32 with +inf for rows that see no key (FlashAttention's convention).
    """
    import torch

    dt = torch.float32 if upcast else q.dtype
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    group = q.shape[2] // k.shape[2]
    kf = kf.repeat_interleave(group, dim=2)
    vf = vf.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(dt)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    lse = lse.masked_fill(torch.isinf(lse) & (lse < 0), float("inf"))
    return out, lse
