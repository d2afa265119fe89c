"""The Hopper kernels against a float32 reference, with FlashAttention-3's tolerance rule.

Rule (FA3's hopper/test_flash_attn.py): max|out − ref| ≤ 2·max|out_emul − ref| + floor, where ref is
attention in float32 of the same 16-bit inputs and out_emul is standard attention run in the input
precision by PyTorch (the error a same-precision implementation is allowed). The output is poisoned
(NaN) before each call so unwritten elements fail. Marker ``gpu``: skipped without an sm_90 GPU.
The validation tests at the bottom need no GPU and run in CI.
"""
from __future__ import annotations

import math
import zlib

import pytest

torch = pytest.importorskip("torch")

import fa3_lab  # noqa: E402
from fa3_lab import api  # noqa: E402
from fa3_lab.torch_ref import attention_ref  # noqa: E402

STEPS16 = api.forward_steps16()  # the 16-bit forward steps (not the backward series)


def step_params(ids):
    """The step ids as pytest params, each with its marker ``stepNN`` (``pytest -m step04`` runs step 04's)."""
    return [pytest.param(s, marks=getattr(pytest.mark, f"step{s:02d}"), id=f"step{s:02d}") for s in ids]


PERSISTENT = [s for s in STEPS16 if s >= 6]   # persistent grid (06+)
DYNAMIC = [s for s in STEPS16 if s >= 7]      # dynamic causal scheduler (07+)
TMA_STORE = [s for s in STEPS16 if s >= 8]    # TMA-store epilogue (08+)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = {"bf16": 1e-3, "fp16": 2e-4}


def describe_mismatch(out, ref, tol, shape_info):
    diff = (out.float() - ref.float()).abs()
    bad = torch.nonzero(~(diff <= tol))
    first = tuple(bad[0].tolist()) if len(bad) else None
    return (f"{shape_info}: max err {diff.max().item():.3e} (tol {tol:.3e}), mean err {diff.mean().item():.3e}, "
            f"{len(bad)} elements over, first at {first}: out {out[first].item() if first else None} "
            f"ref {ref[first].item() if first else None}")


def run_case(step, dtype_name, headdim, causal, batch, seqlen_q, seqlen_k, nheads, nheads_kv, seed):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, headdim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, seqlen_k, nheads_kv, headdim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, seqlen_k, nheads_kv, headdim, device="cuda", dtype=dtype, generator=g)
    return check_case(step, dtype_name, q, k, v, causal, f"seed {seed}")


def check_case(step, dtype_name, q, k, v, causal, note=""):
    """Run `step` on q, k, v (BSHD, 16-bit, cuda) and compare with the float32 reference (module docstring)."""
    headdim = q.shape[-1]
    scale = 1.0 / math.sqrt(headdim)
    out = torch.full_like(q, float("nan"))  # poison
    out, lse = fa3_lab.flash_attn_func(q, k, v, causal=causal, step=step, return_lse=True, out=out)
    torch.cuda.synchronize()
    ref, lse_ref = attention_ref(q, k, v, causal, scale)
    emul, _ = attention_ref(q, k, v, causal, scale, upcast=False)
    info = (f"step {step:02d} {dtype_name} headdim {headdim} causal={causal} q {tuple(q.shape)} k {tuple(k.shape)} "
            f"{note}")
    tol = 2 * (emul.float() - ref).abs().max().item() + FLOOR[dtype_name]
    assert torch.isfinite(out).all(), f"{info}: non-finite output (unwritten or NaN)"
    assert (out.float() - ref).abs().max().item() <= tol, describe_mismatch(out, ref, tol, info)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isinf(lse), ~finite), f"{info}: lse +inf pattern differs from the reference"
    lse_err = (lse[finite] - lse_ref[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-3 * max(1.0, lse_ref[finite].abs().max().item()), f"{info}: lse max err {lse_err:.3e}"
    return q, k, v, out


SHAPES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_kv)
    (1, 1, 1, 1, 1),
    (2, 113, 203, 4, 2),
    (1, 203, 113, 6, 3),
    (1, 1000, 1000, 2, 1),
    (2, 128, 8448 // 4, 2, 2),
    (1, 512, 512, 8, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(STEPS16))
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(step, dtype_name, headdim, causal, shape):
    seed = zlib.crc32(repr((step, dtype_name, headdim, causal, shape)).encode())  # the same in every process
    run_case(step, dtype_name, headdim, causal, *shape, seed=seed)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("step", step_params(STEPS16))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_table2_length(step, causal):
    """The paper's ablation length (8448, not a multiple of any tile) at headdim 128."""
    run_case(step, "bf16", 128, causal, 1, 8448, 8448, 2, 2, seed=7 + step)


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(PERSISTENT))
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_persistent_grid_more_tiles_than_sms(step, headdim, causal):
    """Steps 06+ launch min(tiles, SMs) CTAs that stride over the work tiles: the K/V ring, Q's empty
    barrier and the pingpong turns carry over from one tile to the next. 4 × 8 heads × 11 row blocks
    of 192 (headdim 64, three consumer warpgroups) or 16 of 128 = 352 or 512 tiles (over 2 per SM);
    seqlen_q > seqlen_k makes causal tiles whose rows see no key sit between tiles that do (O = 0,
    lse = +inf there)."""
    batch, seqlen_q, seqlen_k, nheads = 4, 2000, 700, 8
    block_m = 192 if headdim == 64 and step >= 9 else 128  # Br (three consumer warpgroups at headdim 64: step 09+)
    tiles = batch * nheads * -(-seqlen_q // block_m)
    assert tiles > 2 * torch.cuda.get_device_properties(0).multi_processor_count
    run_case(step, "bf16", headdim, causal, batch, seqlen_q, seqlen_k, nheads, 2, seed=headdim + causal)


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(DYNAMIC))
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_causal_both_schedulers(step, headdim):
    """Causal steps 07+ take the dynamic tile scheduler up to kDynamicMaxSeqlen (8192) keys and one
    CTA per tile beyond: one case on each side of the switch."""
    for seqlen_k in (8192, 8193 + 64):
        run_case(step, "bf16", headdim, True, 1, 384, seqlen_k, 2, 1, seed=headdim + seqlen_k)


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(STEPS16))
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_running_max_moves(step, dtype_name, headdim, causal):
    """Scores with a per-key offset that steps by −2 … +6 (natural-log units) every 32 keys, growing towards
    key 0: the kernels walk the K/V tiles from the last to the first, so the running row max moves up
    tile after tile, by less and by more than step 04's lazy-rescale threshold (2^8), and sometimes not
    at all. q = u + noise, k_j = a_j·u + noise with a fixed direction u, so q·k_j ≈ a_j·|u|² + noise."""
    g = torch.Generator(device="cuda").manual_seed(headdim * 2 + causal)
    batch, seqlen, nheads = 1, 1000, 2
    scale = 1.0 / math.sqrt(headdim)
    u = torch.ones(headdim, device="cuda") / math.sqrt(headdim)  # |u| = 1
    steps = torch.rand(seqlen // 32 + 1, device="cuda", generator=g) * 8 - 2  # −2 … +6 per 32 keys
    offset = steps.flip(0).cumsum(0).flip(0).repeat_interleave(32)[:seqlen]  # larger towards key 0
    a = offset / scale  # q·k_j·scale ≈ offset_j
    noise = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    q = (u + 0.3 * noise(batch, seqlen, nheads, headdim)).to(DTYPES[dtype_name])
    k = (a[None, :, None, None] * u + noise(batch, seqlen, nheads, headdim)).to(DTYPES[dtype_name])
    v = noise(batch, seqlen, nheads, headdim).to(DTYPES[dtype_name])
    check_case(step, dtype_name, q, k, v, causal, f"ramped scores (offset range {offset.min():.0f} … {offset.max():.0f})")


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(STEPS16))
def test_deterministic(step):
    """Bitwise identical output run to run (no atomics, fixed reduction order)."""
    q, k, v, out = run_case(step, "bf16", 128, True, 2, 777, 1024, 4, 2, seed=11)
    again = fa3_lab.flash_attn_func(q, k, v, causal=True, step=step)
    assert torch.equal(out, again), f"step {step:02d}: output differs between two identical calls"


@pytest.mark.gpu
def test_noncontiguous_strides():
    """q/k/v as slices of a packed qkv tensor (batch/seq/head strides differ from contiguous)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(2, 300, 3, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(dim=2)
    out = fa3_lab.flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, True, 128 ** -0.5)
    emul, _ = attention_ref(q, k, v, True, 128 ** -0.5, upcast=False)
    tol = 2 * (emul.float() - ref).abs().max().item() + FLOOR["bf16"]
    assert (out.float() - ref).abs().max().item() <= tol, describe_mismatch(out, ref, tol, "packed qkv")


@pytest.mark.gpu
@pytest.mark.parametrize("step", step_params(TMA_STORE))
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_out_view_with_padded_strides(step, headdim, causal):
    """out= a view into a larger buffer (heads padded 5 → 7, rows padded by one head): the TMA-store
    epilogue (O staged in its own tile at headdims 64/128, in the K or V ring at 256) writes through O's own
    tensor map with these strides, and nothing outside the view is touched. 200 query rows: the last row block is partial (TMA clips the rows past seqlen_q)."""
    g = torch.Generator(device="cuda").manual_seed(headdim + causal)
    q, k, v = (torch.randn(2, 200, 5, headdim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    buf = torch.full((2, 200, 7, headdim), 7.0, device="cuda", dtype=torch.bfloat16)
    out = buf[:, :, 1:6]
    fa3_lab.flash_attn_func(q, k, v, causal=causal, step=step, out=out)
    ref, _ = attention_ref(q, k, v, causal, headdim ** -0.5)
    emul, _ = attention_ref(q, k, v, causal, headdim ** -0.5, upcast=False)
    tol = 2 * (emul.float() - ref).abs().max().item() + FLOOR["bf16"]
    assert (out.float() - ref).abs().max().item() <= tol, describe_mismatch(out, ref, tol, "padded out")
    assert (buf[:, :, 0] == 7).all() and (buf[:, :, 6] == 7).all(), "the kernel wrote outside out's view"


@pytest.mark.gpu
def test_out_with_unaligned_strides_is_refused():
    """out= whose head stride is 129 elements (258 bytes) cannot be a TMA store target: a ValueError naming
    out, and nothing written."""
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.bfloat16)
    buf = torch.full((1, 64, 2, 129), 7.0, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out: TMA needs .*16-byte aligned base and strides, got strides \(16512, 258, 129, 1\)"):
        fa3_lab.flash_attn_func(q, q, q, out=buf[..., :128])
    assert (buf == 7).all()


# ----------------------------------------------------------------------- validation (no GPU needed)

def _cpu(shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "q, k, v, kwargs, exc, words",
    [
        ([1], _cpu((1, 8, 2, 64)), _cpu((1, 8, 2, 64)), {}, TypeError, "q: expected a torch.Tensor"),
        (_cpu((1, 8, 2, 64), torch.float32), _cpu((1, 8, 2, 64), torch.float32), _cpu((1, 8, 2, 64), torch.float32),
         {}, TypeError, "q: expected dtype float16 or bfloat16, got torch.float32"),
        (_cpu((1, 8, 2, 64)), _cpu((1, 8, 2, 64), torch.float16), _cpu((1, 8, 2, 64)), {}, TypeError, "k, v: expected the dtype of q"),
        (_cpu((1, 8, 2, 64)), _cpu((1, 8, 2, 64)), _cpu((1, 8, 2, 64)), {}, TypeError, "q: expected a CUDA tensor"),
    ],
)
def test_validation_types(q, k, v, kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fa3_lab.flash_attn_func(q, k, v, **kwargs)


def test_validation_needs_gpu_message(monkeypatch):
    """With tensors that pass every check, a machine without sm_90 gets RuntimeError, not a fallback."""
    from fa3_lab import _env

    if not _env.why_no_sm90():
        pytest.skip("this machine has an sm_90 GPU")

    # Shape/dtype/device checks happen first; emulate CUDA placement by patching the device property.
    q = _cpu((1, 8, 2, 64))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    with pytest.raises(RuntimeError, match="needs an sm_90 GPU"):
        fa3_lab.flash_attn_func(q, q, q)


@pytest.mark.parametrize(
    "qs, ks, kwargs, exc, words",
    [
        ((1, 8, 2), (1, 8, 2), {}, ValueError, "q: expected 4 dims"),
        ((1, 8, 2, 96), (1, 8, 2, 96), {}, ValueError, "q: expected headdim in (64, 128, 256), got 96"),
        ((1, 8, 3, 64), (1, 8, 2, 64), {}, ValueError, "k: nheads (3) must be a multiple of nheads_kv (2)"),
        ((1, 8, 2, 64), (1, 8, 2, 128), {}, ValueError, "k: expected headdim 64 (from q), got 128"),
        ((2, 8, 2, 64), (1, 8, 2, 64), {}, ValueError, "k: expected batch 2 (from q), got 1"),
        ((1, 8, 2, 64), (1, 8, 2, 64), {"softmax_scale": -1.0}, ValueError, "softmax_scale: expected a positive"),
        ((1, 8, 2, 64), (1, 8, 2, 64), {"softmax_scale": "x"}, TypeError, "softmax_scale: expected a float"),
    ],
)
def test_validation_shapes(monkeypatch, qs, ks, kwargs, exc, words):
    """Shape errors are raised before any GPU is needed (device check patched to pass on CPU)."""
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)), raising=False)
    q, k = _cpu(qs), _cpu(ks)
    import re

    with pytest.raises(exc, match=re.escape(words)):
        fa3_lab.flash_attn_func(q, k, k, **kwargs)


def test_steps_listing():
    listed = fa3_lab.steps()
    assert [s.id for s in listed] == sorted(s.id for s in listed)
    assert listed and listed[0].name == "01_tma_wgmma"
    for s in listed:
        assert s.adds and s.paper


def test_default_step_per_headdim():
    """Every headdim has a default step that exists; a bad headdim is refused by name."""
    import re

    for d in (64, 128, 256):
        assert api.default_step(d) in [s.id for s in api.steps()]
    with pytest.raises(ValueError, match=re.escape("headdim: expected one of (64, 128, 256), got 96")):
        api.default_step(96)
