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
``torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, step)
-> (dq, dk, dv)``, a backward kernel step (``cuda/steps/bwd/``, paper App. B.1 Algorithm 3; its NumPy
twin is ``reference.backward.flash_attention_backward``). Its fake implementation gives dq/dk/dv shapes,
so ``torch.compile(fullgraph=True)`` traces a whole training step. A dout of the wrong shape, dtype or
device raises at once, naming dout. A forward under ``torch.no_grad()`` records nothing.

Eager calls on real tensors skip the dispatcher: :func:`forward` runs the same checks and kernels from a
``torch.autograd.Function`` (``_EagerFlashAttn``; a launch-bound training step pays for every µs of host
time). Compiled graphs, fake and meta tensors use the ops above.

Importing this module registers the ops (once per process). Needs torch >= 2.4 (``custom_op``).
"""
# No `from __future__ import annotations` here: torch.library reads the op signatures at definition
# time; the schemas below are written out anyway, so the ops do not depend on annotation handling.
import torch

from . import registry
from ._validate import has_storage

__all__ = ["flash_attn_fwd", "flash_attn_fwd_out", "flash_attn_bwd", "forward", "check_dout", "OP", "OP_OUT",
           "OP_BWD", "BWD_STEP"]

#: Qualified names of the ops (``torch.ops.fa3_lab.<name>``).
OP = "fa3_lab::flash_attn_fwd"
OP_OUT = "fa3_lab::flash_attn_fwd_out"
OP_BWD = "fa3_lab::flash_attn_bwd"

#: The backward kernel step autograd runs by default (cuda/steps/bwd/; registry.DEFAULT_BWD_STEP). The ops' schemas
#: take their defaults from it: the dispatcher drops an argument equal to its schema default and the Python
#: function then fills in its own default, so the two must be the same number (a schema default of 11 beside a
#: Python default of 13 made bwd_step=11 run step 13).
BWD_STEP = registry.DEFAULT_BWD_STEP


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
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, int step,"
                                f" bool deterministic=False, int bwd_step={BWD_STEP}) -> (Tensor, Tensor)")
def flash_attn_fwd(q, k, v, causal, softmax_scale, step, deterministic=False, bwd_step=BWD_STEP):
    """FlashAttention-3 forward, one kernel step, as an opaque op (paper §3, Alg. 1–2).

    Args:
        q: (batch, seqlen_q, nheads, headdim) fp16/bf16 CUDA tensor, last dim contiguous.
        k, v: (batch, seqlen_k, nheads_kv, headdim), same dtype/device; nheads % nheads_kv == 0.
        causal: bottom-right aligned causal mask.
        softmax_scale: α (already resolved: flash_attn_func turns None into 1/sqrt(headdim)).
        step: kernel step id (``fa3_lab.steps()``).
        deterministic, bwd_step: not used by the forward; saved for the backward (dQ accumulated in a fixed
            order; the backward kernel step).

    Returns:
        out (q's shape, dtype and strides) and lse (batch, nheads, seqlen_q) float32, natural log.

    Raises:
        TypeError / ValueError: dtype, shapes or base alignment outside the kernel's contract (the
            full checks, with flash_attn_func's messages, run in :func:`fa3_lab.flash_attn_func`).
        RuntimeError: from the extension (not a CUDA tensor, no sm_90 GPU, unknown step).
    """
    return _fwd(q, k, v, causal, softmax_scale, step)


def _fwd(q, k, v, causal, softmax_scale, step):
    # the forward op's body on real tensors, shared with _EagerFlashAttn
    _check_real(q, k, v)
    out, lse = _ext().fwd(step, q, k, v, causal, softmax_scale, None, None, 0)
    return out, lse


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, causal, softmax_scale, step, deterministic=False, bwd_step=BWD_STEP):
    # Shapes/dtypes/strides only; mirrors cuda/binding.cpp: out = at::empty_like(q) (q's strides kept
    # for a dense q), lse = at::empty({batch, nheads, seqlen_q}, float32).
    out = torch.empty_like(q)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def check_dout(dout, out):
    """dout must be a tensor of out's shape, dtype and device (checked before any backward work).

    Works on fake tensors too (shape/dtype/device only), so a compiled graph checks it at trace time.

    Raises:
        TypeError: not a tensor, or another dtype or device than out.  ValueError: another shape.
    """
    if not isinstance(dout, torch.Tensor):
        raise TypeError(f"dout: expected a torch.Tensor (the gradient of out), got {type(dout).__name__}")
    if dout.dtype != out.dtype:
        raise TypeError(f"dout: expected dtype {out.dtype} (that of out), got {dout.dtype}")
    if dout.device != out.device:
        raise TypeError(f"dout: expected device {out.device} (that of out), got {dout.device}")
    if dout.shape != out.shape:
        raise ValueError(f"dout: expected shape {tuple(out.shape)} (that of out), got {tuple(dout.shape)}")


@torch.library.custom_op(OP_BWD, mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal,"
                                f" float softmax_scale, bool deterministic=False, int step={BWD_STEP})"
                                " -> (Tensor, Tensor, Tensor)")
def flash_attn_bwd(dout, q, k, v, out, lse, causal, softmax_scale, deterministic=False, step=BWD_STEP):
    """FlashAttention-3 backward (paper App. B.1, Algorithm 3): dq, dk, dv from the forward's out and lse.

    Runs backward step ``step`` (``cuda/steps/bwd/NN_*.cu``, ``fa3_lab.registry``): a preprocess kernel (D =
    rowsum(dout ∘ out)), the main kernel (K/V tiles stationary per CTA, Q/dout tiles streamed, dQ added in fp32
    to a workspace) and a postprocess (dQ to the input dtype; for GQA, dk and dv summed over each head group).

    Args:
        dout: dL/d(out), out's shape and dtype; any strides (copied to a contiguous tensor first when its last
            dim is not contiguous or a stride is not 16-byte aligned: it is loaded by TMA).
        q, k, v, out, lse: the forward's inputs and outputs (see :func:`flash_attn_fwd`).
        causal, softmax_scale: the forward's.
        deterministic: dQ accumulated in n_block order (bitwise reproducible); default in arrival order.
        step: backward kernel step id.

    Returns:
        (dq, dk, dv): contiguous, shapes and dtype of q, k, v; dk, dv summed over the query heads of each KV head.
        Rows that see no key (causal, seqlen_q > seqlen_k) get zero gradients.

    Raises:
        TypeError / ValueError: dout of another dtype, device or shape than out; q, k, v outside the contract.
    """
    check_dout(dout, out)
    _check_real(q, k, v)
    return _bwd(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, step)


def _bwd(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, step):
    # the backward op's body after its checks, shared with _EagerFlashAttn (whose forward checked q, k, v)
    dq, dk, dv = _ext().bwd(int(step), dout, q, k, v, out, lse, bool(causal), float(softmax_scale),
                            bool(deterministic), None, 0)
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale, deterministic=False, step=BWD_STEP):
    check_dout(dout, out)
    # cuda/binding_bwd.cpp returns contiguous tensors whatever the inputs' strides
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, _step, deterministic, bwd_step = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.softmax_scale, ctx.deterministic, ctx.bwd_step = causal, softmax_scale, deterministic, bwd_step


def _backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored (as FlashAttention): lse is returned for inspection, not as a differentiable output.
    q, k, v, out, lse = ctx.saved_tensors
    check_dout(grad_out, out)
    dq, dk, dv = torch.ops.fa3_lab.flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                                  ctx.deterministic, ctx.bwd_step)
    return dq, dk, dv, None, None, None, None, None


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


class _EagerFlashAttn(torch.autograd.Function):
    """The eager path of :func:`forward`: the custom ops' kernels and checks, called straight from an autograd
    Function. The custom ops' dispatcher round trips cost more host time per forward + backward than the two
    kernels' launches themselves, and a training step of a small model is bound by its host (measured in
    docs/performance.md, "Host overhead", with tools/experiments/host_overhead.py). torch.compile, fake and
    meta tensors still go through the custom ops (their fake impls and schemas are what a graph records)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, step, deterministic, bwd_step):
        out, lse = _fwd(q, k, v, causal, softmax_scale, step)
        # lse stays differentiable, its gradient ignored: as the custom op
        _setup_context(ctx, (q, k, v, causal, softmax_scale, step, deterministic, bwd_step), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # grad_lse ignored (FlashAttention's convention)
        q, k, v, out, lse = ctx.saved_tensors
        check_dout(grad_out, out)
        dq, dk, dv = _bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.deterministic, ctx.bwd_step)
        return dq, dk, dv, None, None, None, None, None


def forward(q, k, v, causal, softmax_scale, step, out=None, deterministic=False, bwd_step=BWD_STEP):
    """Run the forward through the custom ops; what :func:`fa3_lab.flash_attn_func` calls last.

    Args:
        q, k, v: validated BSHD tensors (see :func:`flash_attn_fwd`).
        causal: bool.  softmax_scale: float α.  step: int kernel step.
        out: None, or a preallocated (batch, seqlen_q, nheads, headdim) tensor of q's dtype/device.
        deterministic: the backward accumulates dQ in a fixed order (bitwise reproducible).
        bwd_step: the backward kernel step autograd runs.

    Returns:
        (out, lse): out (batch, seqlen_q, nheads, headdim), dtype of q; lse (batch, nheads, seqlen_q)
        float32.

    Raises:
        RuntimeError: ``out`` given while grad mode is on and q, k or v requires grad (an ``out=``
            write cannot be differentiated, as for torch's own ``out=`` functions).
    """
    if out is None:
        if has_storage(q):  # eager, real tensors: no dispatcher round trips (_EagerFlashAttn)
            return _EagerFlashAttn.apply(q, k, v, bool(causal), float(softmax_scale), int(step), bool(deterministic),
                                         int(bwd_step))
        return torch.ops.fa3_lab.flash_attn_fwd(q, k, v, bool(causal), float(softmax_scale), int(step),
                                                bool(deterministic), int(bwd_step))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, out)):
        raise RuntimeError("out: flash_attn_func(..., out=...) does not support autograd (q, k, v or out "
                           "requires grad); call it without out=, or under torch.no_grad()")
    lse = torch.ops.fa3_lab.flash_attn_fwd_out(q, k, v, out, bool(causal), float(softmax_scale), int(step))
    return out, lse
