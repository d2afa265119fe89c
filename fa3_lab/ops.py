"""The lab's forward kernel as PyTorch custom ops, so that ``torch.compile`` sees one opaque node.

:func:`fa3_lab.flash_attn_func` validates its inputs in Python and then calls :func:`forward`, which
calls one of two ``torch.library`` custom ops:

* ``torch.ops.fa3_lab.flash_attn_fwd(q, k, v, causal, softmax_scale, step) -> (out, lse)`` — the
  functional op (fresh ``out``); this is what a compiled graph holds.
* ``torch.ops.fa3_lab.flash_attn_fwd_out(q, k, v, out, causal, softmax_scale, step) -> lse`` — writes
  into a preallocated ``out`` (``flash_attn_func(..., out=out)``; declared as mutating ``out``).

Each op has a fake (meta) implementation giving the output shapes, dtypes and strides without running
anything, which is what ``torch.compile`` (dynamo + AOTAutograd) traces with: ``out`` is
``empty_like(q)`` (q's dtype and strides, as ``at::empty_like`` in ``cuda/binding.cpp``), ``lse`` is
``(batch, nheads, seqlen_q)`` float32. The real implementation builds/loads the CUDA extension on
first use (``fa3_lab._build.load``), never at import.

Autograd: when q, k or v requires grad, the forward records a backward node that calls
``torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale) -> (dq, dk, dv)``, a
placeholder op that raises NotImplementedError when it runs (the backward kernel is not written yet;
``reference.backward.flash_attention_backward`` is the NumPy reference, paper App. B.1 Algorithm 3).
Its fake implementation gives dq/dk/dv shapes, so compiling a model whose weights require grad still
works; only an actual ``.backward()`` raises. A forward under ``torch.no_grad()`` records nothing.

Importing this module registers the ops (once per process). Needs torch >= 2.4 (``custom_op``).
"""
# No `from __future__ import annotations` here: torch.library reads the op signatures at definition
# time; the schemas below are written out anyway, so the ops do not depend on annotation handling.
import torch

__all__ = ["flash_attn_fwd", "flash_attn_fwd_out", "flash_attn_bwd", "forward", "OP", "OP_OUT", "OP_BWD",
           "BACKWARD_MESSAGE"]

#: Qualified names of the ops (``torch.ops.fa3_lab.<name>``).
OP = "fa3_lab::flash_attn_fwd"
OP_OUT = "fa3_lab::flash_attn_fwd_out"
OP_BWD = "fa3_lab::flash_attn_bwd"

#: What a backward through the forward raises.
BACKWARD_MESSAGE = (
    "fa3_lab.flash_attn_func: backward kernel not implemented yet; "
    "reference.backward.flash_attention_backward is the NumPy reference (paper App. B.1, Algorithm 3). "
    "Run the forward under torch.no_grad() (inference) or use torch.nn.functional.scaled_dot_product_attention "
    "for training."
)


def _ext():
    from . import _build

    return _build.load()  # lru_cached: compiles on first use only


def _check_real(q, k, v):
    """The kernel's contract, checked on real tensors before every launch.

    flash_attn_func checks everything first (with its messages); these few checks are what a
    direct caller of the op, or a compiled graph, must not get past: a compiled graph calls the op
    without re-running flash_attn_func's Python, whose checks ran at trace time on fake tensors that
    have no base pointer — so the 16-byte alignment TMA needs is checked here.

    Raises:
        TypeError: not CUDA; dtype not fp16/bf16 or mixed.  ValueError: headdim, heads, base alignment.
    """
    from ._validate import HEADDIMS

    if not (q.device.type == k.device.type == v.device.type == "cuda"):
        raise TypeError(f"q, k, v: expected CUDA tensors (on an sm_90 GPU), got {q.device}, {k.device}, {v.device}")
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[3] not in HEADDIMS \
            or k.shape[3] != q.shape[3] or k.shape[0] != q.shape[0] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q, k, v: expected q (batch, seqlen_q, nheads, headdim) and k, v (batch, seqlen_k, "
                         f"nheads_kv, headdim) with headdim in {HEADDIMS} and nheads % nheads_kv == 0, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name}: TMA needs a 16-byte aligned base, got address % 16 = {t.data_ptr() % 16}")


@torch.library.custom_op(OP, mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, int step)"
                                " -> (Tensor, Tensor)")
def flash_attn_fwd(q, k, v, causal, softmax_scale, step):
    """FlashAttention-3 forward, one kernel step, as an opaque op (paper §3, Alg. 1–2).

    Args:
        q: (batch, seqlen_q, nheads, headdim) fp16/bf16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask.
        softmax_scale: α (already resolved: flash_attn_func turns None into 1/sqrt(headdim)).
        step: kernel step id (``fa3_lab.steps()``).

    Returns:
        out (q's shape, dtype and strides) and lse (batch, nheads, seqlen_q) float32, natural log.

    Raises:
        TypeError / ValueError: dtype, shapes or base alignment outside the kernel's contract (the
            full checks, with flash_attn_func's messages, run in :func:`fa3_lab.flash_attn_func`).
        RuntimeError: from the extension (not a CUDA tensor, no sm_90 GPU, unknown step).
    """
    _check_real(q, k, v)
    out, lse = _ext().fwd(step, q, k, v, causal, softmax_scale, None, None, 0)
    return out, lse


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, causal, softmax_scale, step):
    # Shapes/dtypes/strides only; mirrors cuda/binding.cpp: out = at::empty_like(q) (q's strides kept
    # for a dense q), lse = at::empty({batch, nheads, seqlen_q}, float32).
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(OP_BWD, mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal,"
                                " float softmax_scale) -> (Tensor, Tensor, Tensor)")
def flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale):
    """Placeholder for the backward kernel (paper App. B.1, Algorithm 3): always raises.

    It is an op, not a Python ``raise`` in the autograd formula, so that ``torch.compile`` of a module
    whose inputs require grad can still trace the joint forward/backward graph (AOTAutograd runs the
    fake implementation below); the error comes when a backward actually runs.

    Raises:
        NotImplementedError: :data:`BACKWARD_MESSAGE`.
    """
    raise NotImplementedError(BACKWARD_MESSAGE)


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, _step = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fa3_lab.flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op(OP_OUT, mutates_args=("out",),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor(a!) out, bool causal, float softmax_scale,"
                                " int step) -> Tensor")
def flash_attn_fwd_out(q, k, v, out, causal, softmax_scale, step):
    """:func:`flash_attn_fwd` writing into ``out`` (q's shape and dtype); returns lse.

    No autograd (like torch's own ``out=`` variants): :func:`forward` refuses grad-requiring inputs.
    """
    _check_real(q, k, v)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(3) != 1 \
            or out.data_ptr() % 16 or any((st * out.element_size()) % 16 for st in out.stride()[:3]):
        raise ValueError(f"out: expected shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}, last dim contiguous, "
                         f"16-byte aligned base and strides (O is stored by TMA); got {tuple(out.shape)}, {out.dtype} "
                         f"on {out.device}, strides {out.stride()}")
    _, lse = _ext().fwd(step, q, k, v, causal, softmax_scale, out, None, 0)
    return lse


@flash_attn_fwd_out.register_fake
def _flash_attn_fwd_out_fake(q, k, v, out, causal, softmax_scale, step):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def forward(q, k, v, causal, softmax_scale, step, out=None):
    """Run the forward through the custom ops; what :func:`fa3_lab.flash_attn_func` calls last.

    Args:
        q, k, v: validated BSHD tensors (see :func:`flash_attn_fwd`).
        causal: bool.  softmax_scale: float α.  step: int kernel step.
        out: None, or a preallocated (batch, seqlen_q, nheads, headdim) tensor of q's dtype/device.

    Returns:
        (out, lse): out (batch, seqlen_q, nheads, headdim), dtype of q; lse (batch, nheads, seqlen_q)
        float32.

    Raises:
        RuntimeError: ``out`` given while grad mode is on and q, k or v requires grad (an ``out=``
            write cannot be differentiated, as for torch's own ``out=`` functions).
    """
    if out is None:
        return torch.ops.fa3_lab.flash_attn_fwd(q, k, v, bool(causal), float(softmax_scale), int(step))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, out)):
        raise RuntimeError("out: flash_attn_func(..., out=...) does not support autograd (q, k, v or out "
                           "requires grad); call it without out=, or under torch.no_grad()")
    lse = torch.ops.fa3_lab.flash_attn_fwd_out(q, k, v, out, bool(causal), float(softmax_scale), int(step))
    return out, lse
