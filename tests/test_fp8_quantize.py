"""The fused FP8 quantize kernel (cuda/fp8_quantize.cu) and the Python around it.

CPU (run in CI): every validation error of ``quantize_for_kernel`` / ``fwd_kernel_layout``
(raised before anything is built or launched), the wiring of ``flash_attn_fp8_func`` to the fused
path (a fake extension records the calls), the byte count, and — marker ``sass``, needs nvcc — the
kernel compiles for sm_90a without spills.

GPU (marker ``gpu``, skipped without an sm_90 GPU): the fused kernel against the torch path it
replaces (``quantize`` in float32 on the GPU, then ``kernel_v_layout``) on awkward shapes, both
16-bit dtypes, every headdim, all four flag combinations and strided / misaligned / broadcast
inputs; inf/NaN detection; ``flash_attn_fp8_func`` end to end against the NumPy emulation
``reference.fp8.fp8_attention`` (FA3's tolerance rule, as tests/test_fp8_kernel.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fa3_lab import _build  # noqa: E402
from fa3_lab import fp8 as F  # noqa: E402
from reference import fp8 as R  # noqa: E402
from reference.attention import standard_attention  # noqa: E402

E4M3 = torch.float8_e4m3fn
FLAGS = [(True, True), (True, False), (False, True), (False, False)]   # (block_quant, incoherent)
EXACT_FRACTION = 0.999   # fused vs torch path: bytes that must agree exactly (expected: all of them)


# --------------------------------------------------------------------------------------------
# CPU: validation (nothing is built or launched on bad input)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_build(monkeypatch):
    """Any attempt to build or load the extension fails the test: errors must come first."""
    def refuse(*a, **kw):
        raise AssertionError("the extension was loaded although the input is invalid")

    monkeypatch.setattr(_build, "load", refuse)


def _qkv_cpu(sq=200, sk=300, h=4, hkv=2, d=128, dtype=torch.bfloat16):
    return (torch.zeros(1, sq, h, d, dtype=dtype), torch.zeros(1, sk, hkv, d, dtype=dtype),
            torch.zeros(1, sk, hkv, d, dtype=dtype))


def _replace(index, value):
    def build():
        args = list(_qkv_cpu())
        args[index] = value(args)
        return args
    return build


BAD_QKV = [
    (_replace(0, lambda a: a[0].float().numpy()), TypeError, "q: expected a torch.Tensor"),
    (_replace(1, lambda a: [1, 2]), TypeError, "k: expected a torch.Tensor"),
    (_replace(0, lambda a: a[0].float()), TypeError, "q: expected dtype float16 or bfloat16, got torch.float32"),
    (_replace(2, lambda a: a[2].to(E4M3)), TypeError, "v: expected dtype float16 or bfloat16"),
    (_replace(1, lambda a: a[1].half()), TypeError, r"k, v: expected the dtype of q \(torch.bfloat16\)"),
    (_replace(2, lambda a: a[2][:, :299]), ValueError, r"v: expected the shape of k \(1, 300, 2, 128\)"),
    (_replace(0, lambda a: torch.zeros(2, 200, 4, 128, dtype=torch.bfloat16)), ValueError, "k: expected batch 2"),
    (_replace(0, lambda a: torch.zeros(1, 200, 4, 64, dtype=torch.bfloat16)), ValueError, "k: expected headdim 64"),
    (_replace(0, lambda a: torch.zeros(1, 200, 3, 128, dtype=torch.bfloat16)), ValueError,
     r"nheads \(3\) must be a multiple of nheads_kv \(2\)"),
    (_replace(0, lambda a: torch.zeros(200, 4, 128, dtype=torch.bfloat16)), ValueError, "q: expected 4 dims"),
    (_replace(0, lambda a: torch.zeros(1, 0, 4, 128, dtype=torch.bfloat16)), ValueError,
     "q: every dimension must be >= 1"),
    (lambda: [torch.zeros(1, 8, 2, 96, dtype=torch.bfloat16) for _ in range(3)], ValueError,
     r"q: expected headdim in \(64, 128, 256\), got 96"),
    (_replace(1, lambda a: torch.zeros(1, 300, 2, 256, dtype=torch.bfloat16)[..., ::2]), ValueError,
     "k: expected the last dim contiguous"),
    (lambda: list(_qkv_cpu()), TypeError, r"q: expected a CUDA tensor \(on an sm_90 GPU\), got device cpu"),
]


@pytest.mark.parametrize("build,exc,match", BAD_QKV)
def test_quantize_for_kernel_rejects_bad_input(no_build, build, exc, match):
    with pytest.raises(exc, match=match):
        F.quantize_for_kernel(*build())


@pytest.mark.parametrize("kw,exc,match", [
    (dict(block_quant=1), TypeError, "block_quant: expected a bool, got int"),
    (dict(incoherent=None), TypeError, "incoherent: expected a bool"),
    (dict(check_finite="yes"), TypeError, "check_finite: expected a bool"),
    (dict(seed=1.5), TypeError, "seed: expected an int"),
    (dict(seed=-1), ValueError, "seed: expected an int >= 0, got -1"),
])
def test_quantize_for_kernel_rejects_bad_flags(no_build, kw, exc, match):
    with pytest.raises(exc, match=match):
        F.quantize_for_kernel(*_qkv_cpu(), **kw)


def test_quantize_for_kernel_accepts_strided_shapes_up_to_the_device_check(no_build):
    """A slice of a packed qkv tensor (strided, not contiguous) passes every shape/stride rule: on a
    CPU tensor the first error is the device, never a stride complaint."""
    qkv = torch.zeros(2, 113, 3, 4, 64, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    with pytest.raises(TypeError, match="q: expected a CUDA tensor"):
        F.quantize_for_kernel(q, k, v)


def test_flash_attn_fp8_func_rejects_bad_input_before_building(no_build):
    q, k, v = _qkv_cpu(d=64)
    with pytest.raises(TypeError, match="return_lse: expected a bool"):
        F.flash_attn_fp8_func(q, k, v, return_lse=None)
    with pytest.raises(ValueError, match="softmax_scale"):
        F.flash_attn_fp8_func(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="q: expected headdim in"):
        F.flash_attn_fp8_func(*(torch.zeros(1, 8, 2, 32, dtype=torch.float16) for _ in range(3)))
    with pytest.raises(TypeError, match="q: expected a CUDA tensor"):
        F.flash_attn_fp8_func(q, k, v)


def _layout_args(batch=1, sq=200, sk=300, h=4, hkv=2, d=128):
    pad = -(-sk // 128) * 128
    return [torch.zeros(batch, sq, h, d).to(E4M3), torch.zeros(batch, sk, hkv, d).to(E4M3),
            torch.zeros(batch, hkv, d, pad).to(E4M3), torch.ones(batch, h, -(-sq // 128)),
            torch.ones(batch, hkv, -(-sk // 128)), torch.ones(batch, hkv, -(-sk // 128))]


@pytest.mark.parametrize("index,value,exc,match", [
    (2, lambda a: a[2].float(), TypeError, "vt8: expected dtype torch.float8_e4m3fn"),
    (2, lambda a: a[1], ValueError, r"vt8: expected shape \(1, 2, 128, 384\)"),      # BSHD v8 by mistake
    (2, lambda a: a[2][..., :256], ValueError, r"vt8: expected shape \(1, 2, 128, 384\) .* got \(1, 2, 128, 256\)"),
    (2, lambda a: a[2][0], ValueError, "vt8: expected 4 dims"),
    (2, lambda a: torch.zeros(1, 2, 384, 128).to(E4M3).transpose(2, 3), ValueError, "vt8: expected a contiguous"),
    (1, lambda a: torch.zeros(1, 300, 2, 64).to(E4M3), ValueError, "k8: expected headdim 128"),
    (0, lambda a: a[0].float(), TypeError, "q8: expected dtype torch.float8_e4m3fn"),
    (3, lambda a: torch.ones(1, 4, 3), ValueError, r"q_descale: expected shape \(1, 4, 2\)"),
    (5, lambda a: a[5].half(), TypeError, "v_descale: expected dtype torch.float32"),
    (0, lambda a: torch.zeros(1, 200, 4, 136).to(E4M3)[..., :128], ValueError, "q8: TMA needs 16-byte"),
])
def test_fwd_kernel_layout_rejects_bad_input(no_build, index, value, exc, match):
    args = _layout_args()
    args[index] = value(args)
    with pytest.raises(exc, match=match):
        F.fwd_kernel_layout(*args)


def test_fwd_kernel_layout_on_cpu_names_the_device(no_build):
    with pytest.raises(TypeError, match="q8: expected a CUDA tensor .* got device cpu"):
        F.fwd_kernel_layout(*_layout_args())
    with pytest.raises(TypeError, match="causal"):
        F.fwd_kernel_layout(*_layout_args(), causal=1)


def test_kernel_v_layout_output_is_a_valid_vt8(no_build, rng):
    """fwd_kernel_layout accepts kernel_v_layout's output (up to the device check)."""
    args = _layout_args(sk=203)
    raw = rng.integers(0, 0x70, size=(1, 203, 2, 128)).astype(np.uint8)
    args[2] = F.kernel_v_layout(torch.from_numpy(raw).view(E4M3))
    with pytest.raises(TypeError, match="q8: expected a CUDA tensor"):
        F.fwd_kernel_layout(*args)


# --------------------------------------------------------------------------------------------
# CPU: flash_attn_fp8_func runs the fused path (fake extension)
# --------------------------------------------------------------------------------------------

class _FakeExt:
    """Records quantize_fp8 / fwd_fp8 calls; returns tensors of the right shapes (on the CPU)."""

    def __init__(self, flags=0):
        self.calls = []
        self.flags = flags

    def quantize_fp8(self, q, k, v, signs, block_quant):
        b, sq, h, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        nq, nk = -(-sq // 128), -(-sk // 128)
        out = (torch.zeros(b, sq, h, d).to(E4M3), torch.zeros(b, sk, hkv, d).to(E4M3),
               torch.zeros(b, hkv, d, nk * 128).to(E4M3), torch.ones(b, h, nq), torch.ones(b, hkv, nk),
               torch.ones(b, hkv, nk), torch.tensor([0, 0, 0, self.flags], dtype=torch.int32))
        self.calls.append(("quantize_fp8", dict(q=q, signs=signs, block_quant=block_quant, out=out)))
        return out

    def fwd_fp8(self, q8, k8, vt8, sq, sk, sv, block_m, block_n, causal, scale, out):
        self.calls.append(("fwd_fp8", dict(q8=q8, vt8=vt8, block_m=block_m, causal=causal, scale=scale)))
        return torch.zeros(q8.shape, dtype=torch.bfloat16), torch.zeros(q8.shape[0], q8.shape[2], q8.shape[1])


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the validation passed on a GPU and the extension is loaded; the torch path must not run."""
    ext = _FakeExt()

    def torch_path(*a, **kw):
        raise AssertionError("flash_attn_fp8_func used the torch quantization path")

    monkeypatch.setattr(F, "_check_qkv_16bit", lambda q, k, v, softmax_scale=None, caller="": 0.125)
    monkeypatch.setattr(F, "_load_ext", lambda caller, need_fwd: ext)
    monkeypatch.setattr(F, "quantize", torch_path)
    monkeypatch.setattr(F, "kernel_v_layout", torch_path)
    return ext


@pytest.mark.parametrize("block_quant,incoherent", FLAGS)
def test_flash_attn_fp8_func_calls_the_fused_kernel(fake_gpu, block_quant, incoherent):
    q, k, v = _qkv_cpu(sq=130, sk=257, d=64)
    o, lse = F.flash_attn_fp8_func(q, k, v, True, block_quant=block_quant, incoherent=incoherent,
                                   return_lse=True)
    (n0, qcall), (n1, fcall) = fake_gpu.calls
    assert (n0, n1) == ("quantize_fp8", "fwd_fp8")
    assert qcall["q"] is q and qcall["block_quant"] is block_quant
    if incoherent:
        np.testing.assert_array_equal(qcall["signs"].numpy(), R.random_signs(64, 0))
        assert qcall["signs"].dtype == torch.float32 and qcall["signs"].device.type == "cpu"
    else:
        assert qcall["signs"] is None
    assert fcall["vt8"] is qcall["out"][2], "the kernel must read the fused kernel's vt8"
    assert fcall["q8"] is qcall["out"][0]
    assert fcall["causal"] is True and fcall["scale"] == 0.125 and fcall["block_m"] == F.BLOCK_M
    assert o.dtype == torch.bfloat16 and tuple(lse.shape) == (1, 4, 130)


@pytest.mark.parametrize("flags,name", [(1, "q"), (2, "k"), (4, "v"), (6, "k")])
def test_fused_nonfinite_flag_raises_naming_the_input(fake_gpu, flags, name):
    fake_gpu.flags = flags
    with pytest.raises(ValueError, match=f"^{name}: expected finite values, got NaN or inf"):
        F.flash_attn_fp8_func(*_qkv_cpu(d=64))
    assert [c[0] for c in fake_gpu.calls] == ["quantize_fp8"], "the attention kernel ran on bad input"


def test_signs_are_the_reference_signs():
    for d in F.HEADDIMS:
        for seed in (0, 7):
            s = F._signs_cpu(d, seed)
            np.testing.assert_array_equal(s.numpy(), R.random_signs(d, seed).astype(np.float32))


def test_quantize_bytes_counts_one_read_and_one_write():
    # q (1, 200, 4, 64), k/v (1, 300, 2, 64): read 2 bytes each, write q8 + k8 + vt8 (300 → 384 keys)
    read = 2 * 64 * (200 * 4 + 2 * 300 * 2)
    write = 64 * (200 * 4 + 300 * 2 + 384 * 2)
    descales = 4 * (2 * 4 + 2 * 3 * 2)
    assert F.quantize_bytes(1, 200, 300, 4, 2, 64) == read + write + descales


# --------------------------------------------------------------------------------------------
# SASS (needs nvcc, no GPU): registers and spills
# --------------------------------------------------------------------------------------------

@pytest.mark.sass
def test_quantize_kernel_compiles_without_spills():
    from fa3_lab.lab import sass

    _, log = sass.compile_source(_build.QUANTIZE_SOURCE)
    rows = [r for r in _build.ptxas_report(log) if "quantize_kernel" in r["kernel"]]
    assert len(rows) == 2 * 3 * 3, [r["kernel"] for r in rows]   # dtype × headdim × mode
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r


# --------------------------------------------------------------------------------------------
# GPU helpers
# --------------------------------------------------------------------------------------------

def _e4m3_ordinal(x: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude e4m3 bytes → integers ordered like the values (adjacent e4m3 values differ by 1,
    ±0 → 0), so |ordinal(a) − ordinal(b)| is the distance in e4m3 ulps. Runs where x lives."""
    b = x.view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def _float32_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of same-sign float32 values in ulps (the descales are positive or NaN)."""
    return (a.contiguous().view(torch.int32).long() - b.contiguous().view(torch.int32).long()).abs()


def _randn(gen, shape, dtype, outliers=True):
    """N(0,1) + N(0,100)·Bernoulli(0.001) in ``dtype`` (paper Table 3's inputs): block scales vary."""
    x = torch.randn(shape, device="cuda", generator=gen)
    if outliers:
        mask = torch.rand(shape, device="cuda", generator=gen) < 1e-3
        x = x + mask * 10.0 * torch.randn(shape, device="cuda", generator=gen)
    return x.to(dtype)


def _padding_mask(seqlen_k: int, seqlen_pad: int) -> torch.Tensor:
    """True at the vt8 columns that hold no key (key index >= seqlen_k)."""
    cols = torch.arange(seqlen_pad)
    keys = (cols // 32) * 32 + torch.tensor(F.PERM)[cols % 32]
    return keys >= seqlen_k


def _compare_with_torch_path(q, k, v, block_quant, incoherent, info, seed=0, exact=False):
    """Fused kernel vs ``quantize`` (torch, float32, same GPU) + ``kernel_v_layout``.

    Asserted: dtypes, shapes, contiguity; e4m3 bytes within one e4m3 ulp and at least
    ``EXACT_FRACTION`` of them identical (``exact``: all); descales within one float32 ulp
    (``exact``: identical); vt8's padding columns all +0. Returns {name: bytes that differ}."""
    got = F.quantize_for_kernel(q, k, v, block_quant=block_quant, incoherent=incoherent, seed=seed)
    ref = F.quantize(q, k, v, block_quant=block_quant, incoherent=incoherent, seed=seed)
    ref_vt8 = F.kernel_v_layout(ref.v8)
    assert isinstance(got, F.Fp8KernelInputs) and got.seqlen_k == k.shape[1], info
    pad = -(-k.shape[1] // 128) * 128
    assert tuple(got.vt8.shape) == (k.shape[0], k.shape[2], k.shape[3], pad), f"{info}: vt8 {tuple(got.vt8.shape)}"
    differ = {}
    for name, a, b in (("q8", got.q8, ref.q8), ("k8", got.k8, ref.k8), ("vt8", got.vt8, ref_vt8)):
        assert a.dtype == E4M3 and a.is_cuda and a.is_contiguous(), f"{info}: {name} dtype/device/layout"
        assert a.shape == b.shape, f"{info}: {name} shape {tuple(a.shape)} vs {tuple(b.shape)}"
        dist = (_e4m3_ordinal(a) - _e4m3_ordinal(b)).abs()
        n_diff = int((dist > 0).sum())
        differ[name] = n_diff
        worst = int(dist.max())
        if worst > (0 if exact else 1) or n_diff > (1 - EXACT_FRACTION) * a.numel():
            first = tuple(int(i) for i in np.unravel_index(int(torch.argmax(dist.flatten())), tuple(a.shape)))
            pytest.fail(f"{info}: {name} {n_diff} of {a.numel()} bytes differ from the torch path, worst "
                        f"{worst} e4m3 ulps at {first} (fused {int(a.view(torch.uint8)[first]):#04x}, torch "
                        f"{int(b.view(torch.uint8)[first]):#04x})")
    for name, a, b in (("q_descale", got.q_descale, ref.q_descale), ("k_descale", got.k_descale, ref.k_descale),
                       ("v_descale", got.v_descale, ref.v_descale)):
        assert a.dtype == torch.float32 and a.is_contiguous() and a.shape == b.shape, f"{info}: {name}"
        ulps = _float32_ulps(a, b)
        if int(ulps.max()) > (0 if exact else 1):
            first = tuple(int(i) for i in np.unravel_index(int(torch.argmax(ulps.flatten())), tuple(a.shape)))
            pytest.fail(f"{info}: {name} differs by {int(ulps.max())} float32 ulps at {first}: fused "
                        f"{a[first].item()!r}, torch {b[first].item()!r}")
    padding = _padding_mask(k.shape[1], pad).to("cuda")
    assert (got.vt8.view(torch.uint8)[..., padding] == 0).all(), f"{info}: vt8 padding is not +0"
    return differ


# --------------------------------------------------------------------------------------------
# GPU: fused kernel == torch path
# --------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (113, 203), (1000, 4096)]   # (seqlen_q, seqlen_k); nheads 4, nheads_kv 2 (GQA), batch 2


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("block_quant,incoherent", FLAGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_fused_matches_torch_path(headdim, dtype, block_quant, incoherent, seqlen_q, seqlen_k):
    gen = torch.Generator(device="cuda").manual_seed(headdim * 131 + seqlen_q * 7 + seqlen_k)
    q = _randn(gen, (2, seqlen_q, 4, headdim), dtype)
    k = _randn(gen, (2, seqlen_k, 2, headdim), dtype)
    v = _randn(gen, (2, seqlen_k, 2, headdim), dtype)
    _compare_with_torch_path(q, k, v, block_quant, incoherent,
                             f"headdim {headdim} {dtype} {block_quant=} {incoherent=} sq {seqlen_q} sk {seqlen_k}")


def _strided(layout, gen, dtype, headdim):
    """Inputs that are not contiguous BSHD tensors (the fused kernel reads any strides)."""
    if layout == "packed_qkv":                 # (b, s, 3, h, d): q, k, v = unbind(2)
        return _randn(gen, (2, 203, 3, 4, headdim), dtype).unbind(2)
    if layout == "packed_gqa":                 # (b, s, h + 2·hkv, d) of a fused projection
        x = _randn(gen, (1, 1000, 4 + 2 * 1, headdim), dtype)
        return x[:, :, :4], x[:, :, 4:5], x[:, :, 5:6]
    if layout == "bhsd":                       # (b, h, s, d) memory, viewed as BSHD
        return tuple(_randn(gen, (2, h, s, headdim), dtype).transpose(1, 2) for s, h in ((113, 4), (300, 2), (300, 2)))
    if layout == "misaligned":                 # base 2 bytes off 16: element-wise loads
        n = 1 * 203 * 2 * headdim
        bufs = [_randn(gen, (n + 1,), dtype) for _ in range(3)]
        q, k, v = (b[1:].view(1, 203, 2, headdim) for b in bufs)
        assert q.data_ptr() % 16
        return q, k, v
    if layout == "broadcast_kv":               # stride 0 over the kv heads
        q = _randn(gen, (1, 129, 4, headdim), dtype)
        k, v = (_randn(gen, (1, 129, 1, headdim), dtype).expand(1, 129, 2, headdim) for _ in range(2))
        return q, k, v
    raise ValueError(layout)


@pytest.mark.gpu
@pytest.mark.parametrize("block_quant,incoherent", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("layout", ["packed_qkv", "packed_gqa", "bhsd", "misaligned", "broadcast_kv"])
def test_fused_reads_strided_inputs(layout, headdim, block_quant, incoherent):
    gen = torch.Generator(device="cuda").manual_seed(headdim + len(layout))
    q, k, v = _strided(layout, gen, torch.bfloat16, headdim)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or layout == "misaligned"
    _compare_with_torch_path(q, k, v, block_quant, incoherent, f"{layout} headdim {headdim} {block_quant=} {incoherent=}")


@pytest.mark.gpu
@pytest.mark.parametrize("incoherent", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_is_bitwise_the_torch_path(dtype, incoherent):
    """The stronger claim of the kernel's header: the same float32 operations in the same order, so
    every byte and every descale is identical (not just within one ulp)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    for headdim in (64, 128, 256):
        q = _randn(gen, (2, 1000, 4, headdim), dtype)
        k, v = (_randn(gen, (2, 777, 2, headdim), dtype) for _ in range(2))
        for block_quant in (True, False):
            _compare_with_torch_path(q, k, v, block_quant, incoherent,
                                     f"bitwise headdim {headdim} {dtype} {block_quant=} {incoherent=}", exact=True)


@pytest.mark.gpu
def test_fused_other_seed_matches_torch_path():
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (_randn(gen, (1, 300, 2, 128), torch.float16) for _ in range(3))
    _compare_with_torch_path(q, k, v, True, True, "seed 12345", seed=12345)
    a = F.quantize_for_kernel(q, k, v, seed=12345)
    b = F.quantize_for_kernel(q, k, v, seed=0)
    assert not torch.equal(a.q8.view(torch.uint8), b.q8.view(torch.uint8)), "the seed changed nothing"


@pytest.mark.gpu
def test_fused_zero_block_outlier_and_saturation():
    """An all-zero 128-row block gets descale 1 and +0 bytes; without rotation the block's largest
    |x| lands exactly on ±448; V's zero block is +0 in vt8."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = _randn(gen, (1, 300, 2, 64), torch.bfloat16)
    k = _randn(gen, (1, 300, 2, 64), torch.bfloat16)
    v = _randn(gen, (1, 300, 2, 64), torch.bfloat16)
    q[:, 128:256] = 0
    v[:, 256:, 1] = 0
    k[0, 5, 1, 7] = -300.0
    t = F.quantize_for_kernel(q, k, v, incoherent=False)
    assert (t.q_descale[0, :, 1] == 1.0).all() and (t.q8[:, 128:256].view(torch.uint8) == 0).all()
    assert t.v_descale[0, 1, 2].item() == 1.0
    assert (t.vt8[0, 1, :, 256:].view(torch.uint8) == 0).all()
    assert t.k8[0, 5, 1, 7].float().item() == -448.0
    assert t.k_descale[0, 1, 0].item() == pytest.approx(300.0 / 448.0, rel=1e-7)
    _compare_with_torch_path(q, k, v, True, False, "zero block / outlier", exact=True)


@pytest.mark.gpu
def test_fused_per_tensor_scale_is_one_number():
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = _randn(gen, (2, 1000, 4, 128), torch.float16)
    k, v = (_randn(gen, (2, 333, 2, 128), torch.float16) for _ in range(2))
    t = F.quantize_for_kernel(q, k, v, block_quant=False, incoherent=False)
    for name, x, s in (("q", q, t.q_descale), ("k", k, t.k_descale), ("v", v, t.v_descale)):
        assert torch.unique(s).numel() == 1, name
        assert s.flatten()[0].item() == pytest.approx(x.abs().max().item() / 448.0, rel=1e-7), name


@pytest.mark.gpu
def test_fused_matches_the_numpy_reference():
    """Against the contract itself (reference.fp8.fp8_attention_inputs in float64), as the torch path
    is tested in tests/test_fp8_kernel.py: exact without rotation, one ulp with it."""
    rng = np.random.default_rng(11)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, n, h, 128))).to(torch.bfloat16)
               for n, h in ((203, 4), (1000, 2), (1000, 2)))
    for block_quant, incoherent in FLAGS:
        ref = R.fp8_attention_inputs(*(x.double().numpy() for x in (q, k, v)), block_quant=block_quant,
                                     incoherent=incoherent)
        t = F.quantize_for_kernel(q.cuda(), k.cuda(), v.cuda(), block_quant=block_quant, incoherent=incoherent)
        v8 = F.kernel_v_layout_inverse(t.vt8, t.seqlen_k)
        ulps = 1 if incoherent else 0
        info = f"{block_quant=} {incoherent=}"
        for name, a, b in (("q8", t.q8, ref.q8), ("k8", t.k8, ref.k8), ("v8", v8, ref.v8)):
            dist = (_e4m3_ordinal(a.cpu()) - _e4m3_ordinal(torch.from_numpy(b.view(np.uint8)).view(E4M3))).abs()
            assert int(dist.max()) <= ulps, f"{info}: {name} off by {int(dist.max())} e4m3 ulps"
            assert int((dist > 0).sum()) <= 0.005 * a.numel(), f"{info}: {name}"
        for name, a, b in (("q_descale", t.q_descale, ref.q_scale), ("k_descale", t.k_descale, ref.k_scale),
                           ("v_descale", t.v_descale, ref.v_scale)):
            assert int(_float32_ulps(a.cpu(), torch.from_numpy(b)).max()) <= ulps, f"{info}: {name}"


@pytest.mark.gpu
@pytest.mark.parametrize("block_quant", [True, False])
def test_fused_detects_nan_and_inf(block_quant):
    gen = torch.Generator(device="cuda").manual_seed(8)
    q, k, v = (_randn(gen, (1, 300, 2, 64), torch.float16) for _ in range(3))
    bad_q, bad_v = q.clone(), v.clone()
    bad_q[0, 200, 1, 3] = float("nan")
    bad_v[0, 7, 0, 60] = float("-inf")
    with pytest.raises(ValueError, match="^q: expected finite values"):
        F.quantize_for_kernel(bad_q, k, v, block_quant=block_quant)
    with pytest.raises(ValueError, match="^v: expected finite values"):
        F.quantize_for_kernel(q, k, bad_v, block_quant=block_quant)
    with pytest.raises(ValueError, match="^v: expected finite values"):
        F.flash_attn_fp8_func(q, k, bad_v, block_quant=block_quant)
    t = F.quantize_for_kernel(bad_q, k, v, block_quant=block_quant, check_finite=False)
    if block_quant:   # only the bad tile is NaN: block 1 of head 1
        nan = torch.isnan(t.q_descale)
        assert nan[0, 1, 1] and int(nan.sum()) == 1, t.q_descale
    else:
        assert torch.isnan(t.q_descale).all()
    assert torch.isfinite(t.k_descale).all() and torch.isfinite(t.v_descale).all()


# --------------------------------------------------------------------------------------------
# GPU: attention through the fused path
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("headdim,causal,sq,sk,h,hkv,dtype,block_quant,incoherent", [
    (128, True, 500, 777, 4, 2, torch.float16, True, True),
    (64, False, 113, 203, 4, 1, torch.bfloat16, False, True),
    (256, True, 1000, 1000, 2, 2, torch.bfloat16, True, False),
    (128, False, 1, 4096, 4, 4, torch.float16, False, False),
])
def test_flash_attn_fp8_func_end_to_end_close_to_emulation(headdim, causal, sq, sk, h, hkv, dtype,
                                                           block_quant, incoherent):
    """FA3's rule (docs/design.md): max|out − ref| ≤ 2·max|emul − ref| + 1 % of max|ref|, ref = float64
    attention of the same 16-bit inputs, emul = reference.fp8.fp8_attention (the kernel contract);
    lse within 1e-3 of the emulation's."""
    rng = np.random.default_rng(headdim + sq + sk)
    q, k, v = (rng.standard_normal((1, n, nh, headdim)) for n, nh in ((sq, h), (sk, hkv), (sk, hkv)))
    q, k, v = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
    q64, k64, v64 = (x.double().numpy() for x in (q, k, v))
    emul, lse_emul = R.fp8_attention(q64, k64, v64, causal=causal, block_quant=block_quant, incoherent=incoherent)
    ref, _ = standard_attention(q64, k64, v64, causal=causal)
    o, lse = F.flash_attn_fp8_func(q.cuda(), k.cuda(), v.cuda(), causal=causal, block_quant=block_quant,
                                   incoherent=incoherent, return_lse=True)
    assert o.dtype == torch.bfloat16 and tuple(o.shape) == (1, sq, h, headdim)
    o = o.float().cpu().numpy()
    err_emul = float(np.abs(emul - ref).max())
    tol = 2 * err_emul + 1e-2 * float(np.abs(ref).max())
    err = np.abs(o - ref)
    assert np.isfinite(o).all() and err.max() <= tol, (
        f"max err {err.max():.3e} > tol {tol:.3e} (err_emul {err_emul:.3e}) at "
        f"{np.unravel_index(int(np.argmax(err)), err.shape)}")
    lse = lse.cpu().numpy()
    finite = np.isfinite(lse_emul)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert (np.abs(lse[finite] - lse_emul[finite]) <= 1e-3 * np.maximum(1.0, np.abs(lse_emul[finite]))).all()


@pytest.mark.gpu
@pytest.mark.parametrize("block_quant,incoherent", FLAGS)
def test_fused_path_output_equals_torch_path_output(block_quant, incoherent):
    """Same e4m3 inputs → the same kernel → the same bits: flash_attn_fp8_func (fused quantize) against
    fwd_quantized(*quantize(...)) (torch quantize + kernel_v_layout), and fwd_kernel_layout against
    fwd_quantized on the torch path's own tensors."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    q = _randn(gen, (2, 700, 4, 128), torch.bfloat16)
    k, v = (_randn(gen, (2, 900, 2, 128), torch.bfloat16) for _ in range(2))
    t = F.quantize(q, k, v, block_quant=block_quant, incoherent=incoherent)
    o_torch = F.fwd_quantized(*t, causal=True)
    o_layout = F.fwd_kernel_layout(t.q8, t.k8, F.kernel_v_layout(t.v8), *t[3:], causal=True)
    assert torch.equal(o_layout, o_torch)
    o_fused = F.flash_attn_fp8_func(q, k, v, causal=True, block_quant=block_quant, incoherent=incoherent)
    diff = (o_fused.float() - o_torch.float()).abs()
    assert torch.equal(o_fused, o_torch), (f"max |fused − torch path| {diff.max().item():.3e}, "
                                           f"{int((diff > 0).sum())} outputs differ")


@pytest.mark.gpu
def test_time_quantize_vs_kernel_row_is_a_valid_result():
    from fa3_lab.lab import results

    from fa3_lab.lab.bench import time_quantize_vs_kernel

    row = time_quantize_vs_kernel(1, 1024, 4, 128, causal=True, nheads_kv=2)
    for key in ("ms", "tflops", "quantize_ms", "quantize_gbps", "tflops_with_quantize", "quantize_torch_ms",
                "v_layout_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["tflops_with_quantize"] < row["tflops"]
    assert row["quantize_ms"] < row["quantize_torch_ms"], "the fused kernel is slower than the torch path"
    meta = results.collect_meta(command="pytest tests/test_fp8_quantize.py")
    results.validate({"meta": meta, "rows": [row]})
