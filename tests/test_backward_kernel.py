"""The backward kernel steps (cuda/steps/bwd/), against a float32 reference, with FA3's rule.

Rule (FA3's hopper/test_flash_attn.py, applied to each of dq, dk, dv):
    max|g − g_ref| ≤ 2·max|g_emul − g_ref| + floor,
g_ref the gradient of standard attention in float32 on the upcast 16-bit inputs (torch.autograd), g_emul
the same computation in the input dtype. The device memory the kernel's outputs come from is poisoned with
NaN first (a freed NaN block the caching allocator hands out again), so unwritten elements fail.
Marker ``gpu`` (skipped without an sm_90 GPU). The main comparison runs every backward step of the registry, each
case marked ``stepNN``; the other tests run the default backward step (``registry.DEFAULT_BWD_STEP``) and carry its
marker. The bad-input tests at the bottom run on CPU.
"""
from __future__ import annotations

import math
import zlib

import pytest

torch = pytest.importorskip("torch")

import fa3_lab  # noqa: E402
from fa3_lab import api, ops, registry  # noqa: E402
from fa3_lab.torch_ref import attention_ref  # noqa: E402

DEFAULT_STEP = getattr(pytest.mark, registry.step(registry.DEFAULT_BWD_STEP).marker)  # the other tests' marker
BWD_STEPS = [pytest.param(s.id, marks=getattr(pytest.mark, s.marker), id=s.marker) for s in registry.series("bwd")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = {"bf16": 1e-3, "fp16": 2e-4}

SHAPES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_kv): GQA ratios 1, 2, 8 and MQA; sq ≠ sk both ways
    (1, 1, 1, 1, 1),
    (2, 7, 7, 2, 2),
    (2, 113, 203, 4, 2),
    (1, 203, 113, 8, 1),
    (1, 1000, 1000, 16, 2),
    (1, 1031, 1031, 2, 2),
    (1, 1, 1000, 2, 1),
    (1, 1000, 7, 2, 2),
]


def poison_allocator(nbytes):
    """Fill `nbytes` of the caching allocator's free memory with NaN, then free it: the next allocations
    (the kernel's outputs and workspace) reuse those blocks, so an element the kernel never writes stays NaN."""
    x = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del x


def make_inputs(dtype_name, headdim, batch, seqlen_q, seqlen_k, nheads, nheads_kv, seed):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, headdim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, seqlen_k, nheads_kv, headdim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, seqlen_k, nheads_kv, headdim, device="cuda", dtype=dtype, generator=g)
    dout = torch.randn(batch, seqlen_q, nheads, headdim, device="cuda", dtype=dtype, generator=g)
    return q, k, v, dout


def reference_grads(q, k, v, dout, causal, scale, upcast):
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in ((q.float(), k.float(), v.float()) if upcast
                                                                    else (q, k, v)))
    out, _ = attention_ref(qs, ks, vs, causal, scale, upcast=upcast)
    return torch.autograd.grad(out, (qs, ks, vs), dout.to(out.dtype))


def ours_grads(q, k, v, dout, causal, deterministic=False, bwd_step=None):
    """dq, dk, dv through autograd (flash_attn_func → the backward op of ``bwd_step``, default the default)."""
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fa3_lab.flash_attn_func(qs, ks, vs, causal=causal, deterministic=deterministic, bwd_step=bwd_step)
    nbytes = 4 * (q.numel() * 3 + k.numel() * 4) + 8 * q.numel() + (1 << 20)
    poison_allocator(nbytes)
    return torch.autograd.grad(out, (qs, ks, vs), dout)


def check_grads(dtype_name, q, k, v, dout, causal, note="", deterministic=False, bwd_step=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    ours = ours_grads(q, k, v, dout, causal, deterministic, bwd_step)
    torch.cuda.synchronize()
    ref = reference_grads(q, k, v, dout, causal, scale, upcast=True)
    emul = reference_grads(q, k, v, dout, causal, scale, upcast=False)
    info = (f"{dtype_name} headdim {q.shape[-1]} causal={causal} q {tuple(q.shape)} k {tuple(k.shape)} {note}")
    report = {}
    for name, g, r, e in zip(("dq", "dk", "dv"), ours, ref, emul):
        assert g.shape == r.shape and g.dtype == q.dtype, f"{info}: {name} shape/dtype {g.shape} {g.dtype}"
        assert torch.isfinite(g).all(), f"{info}: {name} has non-finite elements (unwritten, or NaN)"
        err = (g.float() - r).abs().max().item()
        tol = 2 * (e.float() - r).abs().max().item() + FLOOR[dtype_name]
        report[name] = (err, tol)
        if not err <= tol:
            diff = (g.float() - r).abs()
            first = tuple(torch.nonzero(diff > tol)[0].tolist())
            raise AssertionError(f"{info}: {name} max err {err:.3e} > tol {tol:.3e} (emul err "
                                 f"{(e.float() - r).abs().max().item():.3e}), mean err {diff.mean().item():.3e}, "
                                 f"{int((diff > tol).sum())} elements over, first at {first}: ours {g[first].item()} "
                                 f"ref {r[first].item()}")
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bwd_step", BWD_STEPS)
def test_backward_matches_reference(bwd_step, dtype_name, headdim, causal, shape):
    if bwd_step not in api.backward_steps():
        pytest.skip(f"backward step {bwd_step} is not built ($FA3_LAB_STEPS)")
    seed = zlib.crc32(repr((dtype_name, headdim, causal, shape)).encode())  # the same in every process
    q, k, v, dout = make_inputs(dtype_name, headdim, *shape, seed=seed)
    check_grads(dtype_name, q, k, v, dout, causal, f"seed {seed}, step {bwd_step}", bwd_step=bwd_step)
    if shape == SHAPES[-2]:  # deterministic mode: one shape per step
        check_grads(dtype_name, q, k, v, dout, causal, f"seed {seed}, step {bwd_step}, deterministic",
                    deterministic=True, bwd_step=bwd_step)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@DEFAULT_STEP
def test_eager_path_and_custom_op_give_the_same_gradients(causal):
    """flash_attn_func's eager path (ops._EagerFlashAttn, no dispatcher) and the custom op with its registered
    autograd (what a compiled graph runs): bitwise the same dq, dk, dv in deterministic mode, a gradient into lse
    ignored by both (FlashAttention's convention), GQA 4/2."""
    q, k, v, dout = make_inputs("bf16", 128, 2, 300, 500, 4, 2, seed=7 + causal)
    grads = []
    for eager in (True, False):
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        if eager:
            out, lse = fa3_lab.flash_attn_func(qs, ks, vs, causal=causal, return_lse=True, deterministic=True)
        else:
            out, lse = torch.ops.fa3_lab.flash_attn_fwd(qs, ks, vs, causal, 128 ** -0.5, api.default_step(128), True,
                                                        registry.DEFAULT_BWD_STEP)
        assert lse.requires_grad
        loss = (out.float() * dout.float()).sum() + lse.sum()
        grads.append(torch.autograd.grad(loss, (qs, ks, vs)))
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), name


GQA_GROUP_STEPS = [pytest.param(s.id, marks=getattr(pytest.mark, s.marker), id=s.marker)
                   for s in registry.series("bwd") if s.id >= 21]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [2, 8])
@pytest.mark.parametrize("bwd_step", GQA_GROUP_STEPS)
def test_gqa_group_walked_by_one_cta(bwd_step, dtype_name, headdim, causal, group):
    """Step 21 on: a CTA walks its KV head's whole group once batch·nheads_kv·n_blocks gives every SM two CTAs
    (heads_per_cta_of); the batch is chosen so that it does on this GPU. seqlen_q ≠ seqlen_k (causal bottom-right)."""
    if bwd_step not in api.backward_steps():
        pytest.skip(f"backward step {bwd_step} is not built ($FA3_LAB_STEPS)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seqlen_q, seqlen_k, nheads_kv = 500, 1024, 3
    n_blocks = -(-seqlen_k // (64 if headdim == 256 else 128))
    batch = -(-2 * sms // (n_blocks * nheads_kv))
    assert batch * nheads_kv * n_blocks >= 2 * sms
    seed = zlib.crc32(repr((dtype_name, headdim, causal, group)).encode())
    q, k, v, dout = make_inputs(dtype_name, headdim, batch, seqlen_q, seqlen_k, group * nheads_kv, nheads_kv, seed)
    check_grads(dtype_name, q, k, v, dout, causal, f"seed {seed}, step {bwd_step}", bwd_step=bwd_step)
    if group == 2:
        check_grads(dtype_name, q, k, v, dout, causal, f"seed {seed}, step {bwd_step}, deterministic",
                    deterministic=True, bwd_step=bwd_step)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("seqlen", [8448, 16384])
@pytest.mark.parametrize("causal", [False, True])
@DEFAULT_STEP
def test_backward_long(seqlen, causal):
    """The paper's ablation length (8448) and 16k at headdim 128 (2 heads, GQA 2:1)."""
    q, k, v, dout = make_inputs("bf16", 128, 1, seqlen, seqlen, 2, 1, seed=seqlen + causal)
    check_grads("bf16", q, k, v, dout, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128, 256])
@DEFAULT_STEP
def test_rows_that_see_no_key_get_zero_gradients(headdim):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q − seqlen_k rows see no key (lse = +inf)."""
    q, k, v, dout = make_inputs("bf16", headdim, 1, 300, 100, 2, 1, seed=headdim)
    dq, dk, dv = ours_grads(q, k, v, dout, True)
    assert (dq[:, :200] == 0).all()
    check_grads("bf16", q, k, v, dout, True)


@pytest.mark.gpu
@pytest.mark.parametrize("headdim", [64, 128, 256])
@DEFAULT_STEP
def test_strided_packed_qkv_and_noncontiguous_dout(headdim):
    """q, k, v as views of one packed (batch, seqlen, 3, nheads, headdim) tensor; dout a transposed view
    (made contiguous by the binding, since TMA loads it) and one with a non-unit last stride."""
    g = torch.Generator(device="cuda").manual_seed(headdim)
    qkv = torch.randn(2, 257, 3, 4, headdim, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    dout_t = torch.randn(2, 4, 257, headdim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    for causal in (False, True):
        check_grads("bf16", q, k, v, dout_t, causal, "packed qkv, transposed dout")
    dout_s = torch.randn(2, 257, 4, 2 * headdim, device="cuda", dtype=torch.bfloat16, generator=g)[..., ::2]
    check_grads("bf16", q, k, v, dout_s, True, "dout with last stride 2")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@DEFAULT_STEP
def test_deterministic_is_bitwise_reproducible(causal):
    """deterministic=True: 100 backward runs at (2, 4096, 16, 128) give bitwise identical dq, dk, dv."""
    q, k, v, dout = make_inputs("bf16", 128, 2, 4096, 4096, 16, 16, seed=11 + causal)
    qs, ks, vs = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = fa3_lab.flash_attn_func(qs, ks, vs, causal=causal, return_lse=True)
    out, lse = out.detach(), lse.detach()
    first = torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, causal, 1 / math.sqrt(128), True)
    for _ in range(99):
        again = torch.ops.fa3_lab.flash_attn_bwd(dout, q, k, v, out, lse, causal, 1 / math.sqrt(128), True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@DEFAULT_STEP
def test_opcheck_backward_op():
    q, k, v, dout = make_inputs("bf16", 128, 2, 113, 203, 8, 2, seed=3)
    out, lse = torch.ops.fa3_lab.flash_attn_fwd(q, k, v, True, 0.1, api.default_step(128))
    for det in (False, True):
        torch.library.opcheck(torch.ops.fa3_lab.flash_attn_bwd.default,
                              (dout, q, k, v, out, lse, True, 0.1, det, api.default_bwd_step()),
                              test_utils=("test_schema", "test_faketensor"))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.fa3_lab.flash_attn_fwd.default, (qg, kg, vg, True, 0.1,
                                                                      api.default_step(128), True))


@pytest.mark.gpu
@DEFAULT_STEP
def test_bad_dout_raises_naming_it():
    q, k, v, dout = make_inputs("bf16", 64, 1, 64, 64, 2, 2, seed=5)
    q.requires_grad_(True)
    out = fa3_lab.flash_attn_func(q, k, v)
    with pytest.raises(RuntimeError, match=r"Mismatch in shape: grad_output\[0\]"):  # autograd's own check
        torch.autograd.grad(out, q, dout[:, :32], retain_graph=True)
    with pytest.raises(ValueError, match=r"dout: expected shape \(1, 64, 2, 64\)"):
        torch.ops.fa3_lab.flash_attn_bwd(dout[:, :32], q.detach(), k, v, out.detach(),
                                         torch.zeros(1, 2, 64, device="cuda"), False, 0.125)
    with pytest.raises(TypeError, match=r"dout: expected dtype torch.bfloat16"):
        torch.ops.fa3_lab.flash_attn_bwd(dout.half(), q.detach(), k, v, out.detach(), torch.zeros(1, 2, 64, device="cuda"),
                                         False, 0.125)
    with pytest.raises(TypeError, match=r"dout: expected device cuda:0"):
        torch.ops.fa3_lab.flash_attn_bwd(dout.cpu(), q.detach(), k, v, out.detach(), torch.zeros(1, 2, 64, device="cuda"),
                                         False, 0.125)


@pytest.mark.gpu
@DEFAULT_STEP
def test_compiled_training_step_fullgraph():
    """torch.compile(fullgraph=True) of projections → flash_attn_func → loss: one graph (AOTAutograd traces
    the backward op's fake impl), and its gradients equal eager's (deterministic backward)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 3 * 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)

    def fwd(x):
        q, k, v = lin(x).view(2, 300, 3, 2, 128).unbind(2)
        return fa3_lab.flash_attn_func(q, k, v, causal=True, deterministic=True).float().square().mean()

    torch._dynamo.reset()
    loss_e = fwd(x)
    loss_e.backward()
    grads_e = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad(set_to_none=True)
    explain = torch._dynamo.explain(fwd)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    loss_c = torch.compile(fwd, fullgraph=True)(x)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for p, g in zip(lin.parameters(), grads_e):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=2e-3)
    torch._dynamo.reset()


@pytest.mark.gpu
@DEFAULT_STEP
def test_peak_memory_beside_cudnn():
    """Extra memory of one backward at (1, 16384, 16, 128) beyond inputs, outputs and gradients: O(b·h·s)
    (dq_accum in fp32 is b·h·s·d·4 bytes, the largest piece), printed beside SDPA's cuDNN backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, dout = make_inputs("bf16", 128, 1, 16384, 16384, 16, 16, seed=1)
    grads_bytes = 3 * q.numel() * q.element_size()

    def peak_extra(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - grads_bytes

    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fa3_lab.flash_attn_func(qs, ks, vs)
    ours = peak_extra(lambda: torch.autograd.grad(out, (qs, ks, vs), dout))
    qt, kt, vt = (t.transpose(1, 2).clone().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out_c = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    dout_t = dout.transpose(1, 2).contiguous()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = peak_extra(lambda: torch.autograd.grad(out_c, (qt, kt, vt), dout_t))
    bhs = q.shape[0] * q.shape[2] * q.shape[1]
    print(f"\npeak extra memory of a backward at (1, 16384, 16, 128): ours {ours / 2**20:.1f} MiB "
          f"({ours / bhs:.0f} B per (batch·head·row)), cuDNN {cudnn / 2**20:.1f} MiB ({cudnn / bhs:.0f} B)")
    assert ours <= 4 * 128 * bhs + 64 * bhs + (8 << 20)  # dq_accum + dout copy + row stats, nothing s²


# ------------------------------------------------------------------------------ no GPU needed

@DEFAULT_STEP
def test_fp8_backward_message_names_the_16bit_path():
    assert "no backward" in api.FP8_BACKWARD_MESSAGE and "flash_attn_func" in api.FP8_BACKWARD_MESSAGE


@DEFAULT_STEP
def test_check_dout_messages():
    out = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"dout: expected a torch.Tensor"):
        ops.check_dout([1.0], out)
    with pytest.raises(ValueError, match=r"dout: expected shape \(1, 4, 2, 64\) \(that of out\), got \(4, 2, 64\)"):
        ops.check_dout(out[0], out)
    ops.check_dout(out.clone(), out)


@DEFAULT_STEP
def test_op_schema_defaults_are_the_python_defaults():
    """The dispatcher drops an argument equal to its schema default and the Python function fills in its own
    default: the two must agree, or bwd_step=<schema default> silently runs the Python default's step (found on
    the H200: bwd_step=11 ran step 13 while the schema said 11 and registry.DEFAULT_BWD_STEP was 13)."""
    for op, arg in ((torch.ops.fa3_lab.flash_attn_fwd.default, "bwd_step"),
                    (torch.ops.fa3_lab.flash_attn_bwd.default, "step")):
        schema_arg = next(a for a in op._schema.arguments if a.name == arg)
        assert schema_arg.default_value == ops.BWD_STEP == registry.DEFAULT_BWD_STEP, (op, schema_arg)
