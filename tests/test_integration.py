"""PyTorch and Hugging Face integration: fa3_lab/ops.py (custom ops), fa3_lab/hf.py (transformers
backend), fa3_lab/examples/llama_prefill.py.

CPU (always): the ops are registered with the right schemas; their fake implementations give the
right shapes/dtypes/strides on fake CUDA tensors; ``torch.compile(fullgraph=True)`` traces
flash_attn_func (its checks included) into one graph holding our op, forward and backward; a bad
dout raises naming it; the HF backend registers, wires layout/GQA/causal/scale like SDPA (the
kernel swapped for the torch reference, float32 on the CPU) and refuses masks and dropout.
GPU (marker ``gpu``): the same on the real kernel — compiled == eager, compiled backward == eager backward,
and the HF GQA
model's logits within the stated tolerance of the float32 model.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fa3_lab
from fa3_lab import _env, _validate, api, ops
from fa3_lab.torch_ref import attention_ref

BF16, FP16 = torch.bfloat16, torch.float16


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


class _Recorder:
    """A torch.compile backend that records each FX graph's call targets and runs the graph as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(_targets(gm))
        return gm.forward


class _Attn(torch.nn.Module):
    def __init__(self, causal=True, out=False):
        super().__init__()
        self.causal, self.use_out = causal, out

    def forward(self, q, k, v):
        out = torch.empty_like(q) if self.use_out else None
        o, lse = fa3_lab.flash_attn_func(q, k, v, causal=self.causal, return_lse=True, out=out)
        return o * 2, lse


@pytest.fixture
def pretend_sm90(monkeypatch):
    """Let flash_attn_func's checks pass on this machine (they end with 'is there an sm_90 GPU'); only
    fake tensors are used with it, so nothing reaches the kernel."""
    monkeypatch.setattr(_env, "why_no_sm90", lambda: "")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ custom ops

def test_ops_are_registered_with_their_schemas():
    fwd = torch.ops.fa3_lab.flash_attn_fwd.default._schema
    assert [a.name for a in fwd.arguments] == ["q", "k", "v", "causal", "softmax_scale", "step", "deterministic",
                                                "bwd_step"]
    assert [str(a.type) for a in fwd.arguments[3:]] == ["bool", "float", "int", "bool", "int"]
    assert len(fwd.returns) == 2 and not any(a.alias_info for a in fwd.arguments)
    out = torch.ops.fa3_lab.flash_attn_fwd_out.default._schema
    assert [a.name for a in out.arguments] == ["q", "k", "v", "out", "causal", "softmax_scale", "step"]
    writes = [a.name for a in out.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert writes == ["out"]
    bwd = torch.ops.fa3_lab.flash_attn_bwd.default._schema
    assert [a.name for a in bwd.arguments] == ["dout", "q", "k", "v", "out", "lse", "causal", "softmax_scale",
                                                "deterministic", "step"] and len(bwd.returns) == 3


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,dtype", [(2, 113, 203, 8, 2, 128, BF16), (1, 1, 1000, 4, 4, 64, FP16),
                                                   (3, 256, 17, 6, 1, 256, BF16)])
def test_fake_impl_shapes_dtypes_strides_on_fake_cuda_tensors(b, sq, sk, h, hkv, d, dtype):
    with FakeTensorMode():
        q = torch.empty(b, sq, h, d, device="cuda", dtype=dtype)
        qt = torch.empty(b, h, sq, d, device="cuda", dtype=dtype).transpose(1, 2)  # what transformers hands over
        k = torch.empty(b, sk, hkv, d, device="cuda", dtype=dtype)
        for qq in (q, qt):
            out, lse = torch.ops.fa3_lab.flash_attn_fwd(qq, k, k, True, 0.5, 2)
            assert out.shape == qq.shape and out.dtype == dtype and out.device.type == "cuda"
            assert out.stride() == qq.stride()  # at::empty_like keeps q's layout, so must the fake
            assert lse.shape == (b, h, sq) and lse.dtype == torch.float32 and lse.device.type == "cuda"
            assert lse.is_contiguous()
        o = torch.empty_like(q)
        lse = torch.ops.fa3_lab.flash_attn_fwd_out(q, k, k, o, False, 0.5, 2)
        assert lse.shape == (b, h, sq) and lse.dtype == torch.float32


def test_flash_attn_func_checks_run_on_fake_tensors(pretend_sm90):
    """Eager flash_attn_func on fake CUDA tensors: same checks and messages, no data_ptr() needed."""
    with FakeTensorMode():
        q = torch.empty(1, 64, 4, 128, device="cuda", dtype=BF16)
        k = torch.empty(1, 64, 2, 128, device="cuda", dtype=BF16)
        with pytest.raises(TypeError, match=r"q: expected dtype float16 or bfloat16, got torch.float32"):
            fa3_lab.flash_attn_func(q.float(), k, k)
        with pytest.raises(ValueError, match=r"q: expected headdim in \(64, 128, 256\), got 96"):
            q96, k96 = (torch.empty(1, 64, n, 96, device="cuda", dtype=BF16) for n in (4, 2))
            fa3_lab.flash_attn_func(q96, k96, k96)
        with pytest.raises(ValueError, match=r"k: nheads \(4\) must be a multiple of nheads_kv \(3\)"):
            kk = torch.empty(1, 64, 3, 128, device="cuda", dtype=BF16)
            fa3_lab.flash_attn_func(q, kk, kk)
        out, lse = fa3_lab.flash_attn_func(q, k, k, causal=True, return_lse=True)  # valid: the fake impl runs
        assert out.shape == q.shape and lse.shape == (1, 4, 64)


def test_alignment_check_still_sees_real_tensors():
    assert _validate.has_storage(torch.zeros(2))
    assert not _validate.has_storage(torch.zeros(2, device="meta"))
    with FakeTensorMode():
        assert not _validate.has_storage(torch.zeros(2))


@pytest.mark.parametrize("use_out", [False, True])
def test_compile_fullgraph_traces_flash_attn_func_into_one_graph(pretend_sm90, use_out):
    rec = _Recorder()
    with FakeTensorMode():
        q = torch.randn(2, 128, 8, 64, device="cuda", dtype=BF16)
        k = torch.randn(2, 128, 2, 64, device="cuda", dtype=BF16)
        o, lse = torch.compile(_Attn(out=use_out), backend=rec, fullgraph=True)(q, k, k)
    assert o.shape == q.shape and lse.shape == (2, 8, 128)
    assert len(rec.graphs) == 1, rec.graphs
    want = "fa3_lab.flash_attn_fwd_out" if use_out else "fa3_lab.flash_attn_fwd"
    assert any(t.startswith(want) for t in rec.graphs[0]), rec.graphs[0]


def test_bad_input_under_compile_raises_our_error(pretend_sm90):
    """The checks run at trace time: dynamo falls back to eager and our TypeError comes out; with
    fullgraph=True dynamo reports it as Unsupported, our message included."""
    def f(q, k, v):
        return fa3_lab.flash_attn_func(q, k, v, causal=True)

    msg = "q: expected dtype float16 or bfloat16, got torch.float32"
    with FakeTensorMode():
        q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.float32)
        with pytest.raises(TypeError, match=msg):
            torch.compile(f, backend="eager")(q, q, q)
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match=msg):
            torch.compile(f, backend="eager", fullgraph=True)(q, q, q)


def test_compile_with_grad_traces_forward_and_backward_graphs():
    """AOTAutograd traces the backward at compile time: the backward op's fake impl lets it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(_targets(gm))
        return make_boxed_func(gm.forward)

    def f(q, k, v):
        o, lse = torch.ops.fa3_lab.flash_attn_fwd(q, k, v, True, 0.125, 2)
        return o * 2

    torch._dynamo.reset()
    q = torch.randn(2, 128, 4, 64, device="meta", dtype=BF16, requires_grad=True)
    k = torch.randn(2, 128, 2, 64, device="meta", dtype=BF16, requires_grad=True)
    v = torch.randn(2, 128, 2, 64, device="meta", dtype=BF16, requires_grad=True)
    o = torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)(q, k, v)
    o.sum().backward()
    torch._dynamo.reset()
    assert len(graphs) == 2
    assert "fa3_lab.flash_attn_fwd.default" in graphs[0]
    assert "fa3_lab.flash_attn_bwd.default" in graphs[1]
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_backward_op_checks_dout_then_the_kernel_contract():
    x = torch.zeros(1, 4, 2, 64, dtype=BF16)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"dout: expected shape \(1, 4, 2, 64\) \(that of out\), got \(1, 4, 2, 32\)"):
        torch.ops.fa3_lab.flash_attn_bwd(x[..., :32], x, x, x, x, lse, True, 0.125)
    with pytest.raises(TypeError, match=r"dout: expected dtype torch.bfloat16 \(that of out\), got torch.float32"):
        torch.ops.fa3_lab.flash_attn_bwd(x.float(), x, x, x, x, lse, True, 0.125)
    with pytest.raises(TypeError, match=r"dout: expected device meta \(that of out\), got cpu"):
        torch.ops.fa3_lab.flash_attn_bwd(x, x, x, x, x.to("meta"), lse, True, 0.125)
    with pytest.raises(TypeError, match=r"expected CUDA tensors"):
        torch.ops.fa3_lab.flash_attn_bwd(x, x, x, x, x, lse, True, 0.125)


def test_bad_dout_raises_at_once_through_autograd_on_meta_tensors():
    """The backward formula checks dout before calling the op (meta tensors: nothing runs)."""
    q = torch.randn(1, 64, 4, 64, device="meta", dtype=BF16, requires_grad=True)
    o, _ = torch.ops.fa3_lab.flash_attn_fwd(q, q, q, False, 0.125, 2)
    with pytest.raises(TypeError, match=r"dout: expected dtype torch.bfloat16 \(that of out\), got torch.float16"):
        torch.ops.fa3_lab.flash_attn_bwd(torch.ones(o.shape, device="meta", dtype=torch.float16), q, q, q, o,
                                         torch.zeros(1, 4, 64, device="meta"), False, 0.125)
    dq, = torch.autograd.grad(o, q, torch.ones_like(o))
    assert dq.shape == q.shape and dq.dtype == BF16


def test_fp8_backward_raises_a_clear_error():
    x = torch.zeros(2, requires_grad=True)
    y = api._Fp8NoBackward.apply(x * 1, x, x, x)
    with pytest.raises(NotImplementedError, match=r"FP8 \(e4m3\) path has no backward.*flash_attn_func"):
        y.sum().backward()


def test_op_called_directly_checks_the_kernel_contract():
    x = torch.zeros(1, 4, 2, 64, dtype=BF16)
    with pytest.raises(TypeError, match=r"expected CUDA tensors"):
        torch.ops.fa3_lab.flash_attn_fwd(x, x, x, False, 0.125, 2)


def test_out_with_autograd_is_refused():
    q = torch.zeros(1, 4, 2, 64, dtype=BF16, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match=r"out: flash_attn_func\(\.\.\., out=\.\.\.\) does not support autograd"):
        ops.forward(q, q, q, True, 0.125, 2, out=torch.empty_like(q, requires_grad=False))


# --------------------------------------------------------------------------- Hugging Face backend

def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=256)


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def test_register_adds_fa3_lab_to_the_attention_and_mask_interfaces(transformers):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import fa3_lab.hf as hf

    assert hf.register() == "fa3_lab"
    assert hf.is_registered() and AttentionInterface._global_mapping["fa3_lab"] is hf.attention_forward
    assert "fa3_lab" in AttentionMaskInterface._global_mapping
    assert hf.register("fa3_lab_again") == "fa3_lab_again" and hf.is_registered("fa3_lab_again")
    with pytest.raises(TypeError, match=r"name: expected a non-empty str"):
        hf.register("")


def test_from_config_accepts_the_backend(transformers):
    from transformers import AutoModelForCausalLM

    import fa3_lab.hf as hf

    hf.register()
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="fa3_lab")
    assert model.config._attn_implementation == "fa3_lab"


class _Layer(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_attention_forward_refuses_what_the_kernel_does_not_do(transformers):
    import fa3_lab.hf as hf

    q = torch.zeros(1, 4, 8, 64, dtype=BF16)
    k = torch.zeros(1, 2, 8, 64, dtype=BF16)
    with pytest.raises(ValueError, match=r"dropout: expected 0.0 .*got 0.1"):
        hf.attention_forward(_Layer(), q, k, k, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match=r"attention_mask: .*got a mask of shape \(1, 8\)"):
        hf.attention_forward(_Layer(), q, k, k, torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match=r"sliding_window: sliding-window"):
        hf.attention_forward(_Layer(), q, k, k, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match=r"softcap"):
        hf.attention_forward(_Layer(), q, k, k, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match=r"output_attentions"):
        hf.attention_forward(_Layer(), q, k, k, None, output_attentions=True)
    with pytest.raises(TypeError, match=r"q: expected a CUDA tensor"):  # flash_attn_func's own check
        hf.attention_forward(_Layer(), q, k, k, None)


@pytest.fixture
def kernel_is_the_reference(monkeypatch):
    """flash_attn_func swapped for the float32 torch reference, recording how it was called — to test
    the transformers glue (layout, GQA, causal, scale) on the CPU."""
    calls = []

    def fake(q, k, v, causal=False, softmax_scale=None, **kwargs):
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=causal, scale=softmax_scale))
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        return attention_ref(q, k, v, causal, scale)[0].to(q.dtype)

    monkeypatch.setattr(api, "flash_attn_func", fake)
    return calls


def _model_pair(seed):
    from transformers import AutoModelForCausalLM

    import fa3_lab.hf as hf

    hf.register()
    torch.manual_seed(seed)
    sdpa = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(_tiny_llama_config(), attn_implementation="fa3_lab").eval()
    ours.load_state_dict(sdpa.state_dict())
    return ours, sdpa


def test_hf_glue_matches_sdpa_with_the_kernel_swapped_for_the_reference(transformers, kernel_is_the_reference, rng):
    ours, sdpa = _model_pair(seed=int(rng.integers(1 << 30)))
    ids = torch.from_numpy(rng.integers(0, 1000, (2, 37)))
    with torch.no_grad():
        a, b = ours(ids).logits, sdpa(ids).logits
    err = (a - b).abs().max().item()
    assert err < 1e-4 * b.abs().max().item(), f"max |ours - sdpa| = {err:.3e}"
    calls = kernel_is_the_reference
    assert len(calls) == 2  # one per layer
    # BSHD, GQA k/v with nheads_kv (2) heads — not repeated; causal from the layer; the layer's scale
    assert calls[0] == dict(q=(2, 37, 4, 64), k=(2, 37, 2, 64), causal=True, scale=ours.model.layers[0].self_attn.scaling)
    with torch.no_grad():  # an all-ones mask is no padding: the mask builder hands us None
        c = ours(ids, attention_mask=torch.ones(2, 37, dtype=torch.long)).logits
    assert torch.equal(a, c)


def test_hf_decode_with_a_kv_cache_matches_sdpa(transformers, kernel_is_the_reference, rng):
    """Decoding: 1 query row against the cache; bottom-right causal lets it see every cached key."""
    ours, sdpa = _model_pair(seed=int(rng.integers(1 << 30)))
    ids = torch.from_numpy(rng.integers(0, 1000, (1, 11)))
    with torch.no_grad():
        g_ours = ours.generate(ids, max_new_tokens=6, do_sample=False)
        g_sdpa = sdpa.generate(ids, max_new_tokens=6, do_sample=False)
    assert g_ours.tolist() == g_sdpa.tolist()
    assert kernel_is_the_reference[-1]["q"][1] == 1 and kernel_is_the_reference[-1]["k"][1] == 16


def test_hf_autocast_hands_the_kernel_the_autocast_dtype(transformers, kernel_is_the_reference):
    """fp32 weights under bf16 autocast: the rotary embedding gives float32 q, k; the backend casts them to
    bf16 as SDPA does (the kernel takes 16-bit only)."""
    import fa3_lab.hf as hf

    seen = []
    real = api.flash_attn_func
    api.flash_attn_func = lambda q, k, v, **kw: (seen.append((q.dtype, k.dtype, v.dtype)), real(q, k, v, **kw))[1]
    try:
        q = torch.randn(1, 2, 8, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = hf.attention_forward(_Layer(), q, q, q, None)
        hf.attention_forward(_Layer(), q, q, q, None)  # no autocast: unchanged
    finally:
        api.flash_attn_func = real
    assert seen == [(BF16, BF16, BF16), (torch.float32,) * 3] and out.dtype == BF16


def test_hf_padding_mask_raises(transformers, kernel_is_the_reference):
    ours, _ = _model_pair(seed=0)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    with pytest.raises(NotImplementedError, match=r"attention_mask: .*padded batch"), torch.no_grad():
        ours(torch.zeros(2, 9, dtype=torch.long), attention_mask=mask)
    assert kernel_is_the_reference == []  # refused before any compute


def test_hf_packed_sequences_and_other_patterns_raise(transformers, kernel_is_the_reference):
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    import fa3_lab.hf as hf

    ours, _ = _model_pair(seed=0)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # two sequences in one row: a block-diagonal mask
    with pytest.raises(NotImplementedError, match=r"mask_function: .*packed sequences"), torch.no_grad():
        ours(torch.zeros(1, 9, dtype=torch.long), position_ids=packed, use_cache=False)
    assert kernel_is_the_reference == []
    with pytest.raises(NotImplementedError, match=r"mask_function: "):
        hf.mask_builder(1, 8, 8, mask_function=sliding_window_causal_mask_function(4))
    assert hf.mask_builder(1, 8, 8, mask_function=causal_mask_function) is None
    assert hf.mask_builder(1, 8, 8, mask_function=causal_mask_function,
                           attention_mask=torch.ones(1, 8, dtype=torch.bool)) is None
    padded = torch.tensor([[False, True, True, True, True, True, True, True]])
    assert torch.equal(hf.mask_builder(1, 8, 8, mask_function=causal_mask_function, attention_mask=padded), padded)


# ---------------------------------------------------------------------------------- the example

def test_logits_tolerance_rule():
    from fa3_lab.examples.llama_prefill import logits_tolerance

    assert logits_tolerance(0.25, 30.0) == pytest.approx(2 * 0.25 + 1e-3 * 30.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sdpa_err: expected a finite number >= 0"):
            logits_tolerance(bad, 1.0)


def test_compare_logits_passes_close_and_fails_far(rng):
    from fa3_lab.examples.llama_prefill import compare_logits

    ref = torch.from_numpy(rng.standard_normal((2, 16, 50))).float() * 5
    sdpa = ref + torch.from_numpy(rng.uniform(-0.05, 0.05, ref.shape)).float()
    close = ref + torch.from_numpy(rng.uniform(-0.06, 0.06, ref.shape)).float()
    r = compare_logits(close, sdpa, ref)
    assert r["within_tolerance"] and r["max_abs_ours_vs_ref"] <= r["tolerance"]
    assert r["tolerance"] == pytest.approx(2 * r["max_abs_sdpa_vs_ref"] + 1e-3 * ref.abs().max().item())
    far = close.clone()
    far[1, 3, 7] += 1.0  # one logit off by 1.0: more than 2 × 0.05 + 1e-3 × scale
    r = compare_logits(far, sdpa, ref)
    assert not r["within_tolerance"] and r["max_abs_ours_vs_ref"] > r["tolerance"]
    with pytest.raises(ValueError, match="expected one shape"):
        compare_logits(far[:1], sdpa, ref)
    nan = close.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="ours: logits contain NaN"):
        compare_logits(nan, sdpa, ref)


def test_example_cli_refuses_without_a_gpu(capsys):
    if not _env.why_no_sm90() == "":
        from fa3_lab.examples.llama_prefill import main

        assert main(["--seqlen", "64"]) == 2
        assert "needs an sm_90 GPU" in capsys.readouterr().out
    else:
        pytest.skip("this machine has an sm_90 GPU (the gpu tests run the example)")


def test_example_flow_on_cpu_with_the_kernel_swapped_for_the_reference(transformers, kernel_is_the_reference,
                                                                       monkeypatch, tmp_path):
    """The whole report path of run() (models, logits, tables, JSON in the results schema) on the CPU;
    the kernel is the reference, timings are fixed numbers — what the GPU run prints is checked there."""
    import json

    from rich.console import Console

    from fa3_lab import _build
    from fa3_lab.lab import bench, results
    from fa3_lab.examples import llama_prefill as lp

    monkeypatch.setattr(lp, "DEVICE", "cpu")
    monkeypatch.setattr(_env, "why_no_sm90", lambda: "")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "CPU stand-in")
    monkeypatch.setattr(_build, "load", lambda *a: None)
    monkeypatch.setattr(bench, "time_ms", lambda fn: (fn(), 1.25)[1])
    monkeypatch.setattr(bench, "peers", lambda: {"sdpa_flash": lambda q, k, v, causal: q})
    monkeypatch.setattr(api, "default_step", lambda headdim=128: 2)
    monkeypatch.setattr(results, "collect_meta", lambda command: {
        "gpu": "CPU stand-in", "sm_count": 1, "torch": torch.__version__, "cuda": None, "cudnn": None,
        "commit": "test", "date": "2026-11-22T00:00:00Z", "command": command})
    console = Console(record=True, width=140)
    doc = lp.run(console, batch=1, seqlen=24, out=tmp_path / "run.json", hidden_size=256, intermediate_size=512,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=500)
    text = console.export_text()
    assert "Logits vs the float32 model" in text and "Whole-model prefill" in text
    assert doc["ok"] and doc["logits"]["within_tolerance"]
    assert {r["impl"] for r in doc["rows"]} == {"step02", "sdpa_flash"}
    assert [r["impl"] for r in doc["hf_attention"]] == ["hf sdpa", "hf fa3_lab"]
    assert set(doc["prefill"]) == {"fa3_lab", "sdpa"}
    assert results.validate(json.loads((tmp_path / "run.json").read_text()))["config"]["seqlen"] == 24


# ------------------------------------------------------------------------------------ bench rounds

def test_bench_rounds_rotate_and_take_the_median(monkeypatch):
    """run_grid times every implementation once per round, in an order that rotates from round to
    round, and reports the median round (ms_rounds keeps them all); a peer that raises gets no row."""
    from fa3_lab.lab import bench

    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: real_randn(*shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    calls = []
    monkeypatch.setattr(fa3_lab, "flash_attn_func", lambda q, k, v, causal, step: calls.append(f"step{step:02d}"))

    def broken(q, k, v, causal):
        raise RuntimeError("this build has no fp16")
    monkeypatch.setattr(bench, "peers", lambda: {"fa3": lambda q, k, v, causal: calls.append("fa3"), "cudnn": broken})
    ms = {"step04": iter([3.0, 1.0, 2.0]), "fa3": iter([5.0, 4.0, 6.0])}

    timed = []

    def fake_time(fn):
        fn()
        timed.append(calls[-1])
        return next(ms[calls[-1]])
    monkeypatch.setattr(bench, "time_ms", fake_time)
    cfg = dict(dtype="fp16", headdim=64, causal=False, batch=1, seqlen=8, nheads=2, nheads_kv=2)
    skipped = []
    rows = bench.run_grid([cfg], [4], with_peers=True, progress=lambda m: m and skipped.append(m), rounds=3)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"step04", "fa3"} and "cudnn skipped" in skipped[0]
    assert by["step04"]["ms"] == 2.0 and by["step04"]["ms_rounds"] == [3.0, 1.0, 2.0]
    assert by["fa3"]["ms"] == 5.0 and by["fa3"]["ms_rounds"] == [5.0, 4.0, 6.0]
    assert by["fa3"]["tflops"] == round(bench.flops(1, 2, 8, 8, 64, False) / 5.0 / 1e9, 2)
    # order (step04, fa3, cudnn) rotated by one per round; cudnn dropped after it raised in round 0
    assert timed == ["step04", "fa3", "fa3", "step04", "step04", "fa3"]
    with pytest.raises(bench.UsageError, match="--rounds"):
        bench.run_grid([cfg], [4], with_peers=False, rounds=0)


# ------------------------------------------------------------------------------------------ GPU

def _qkv(b, sq, sk, h, hkv, d, dtype=BF16, seed=0, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, s, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)
            for s, n in ((sq, h), (sk, hkv), (sk, hkv))]


@pytest.mark.gpu
def test_gpu_opcheck_schema_and_fake_impl():
    q, k, v = _qkv(2, 113, 203, 8, 2, 128)
    for causal in (False, True):
        torch.library.opcheck(torch.ops.fa3_lab.flash_attn_fwd.default, (q, k, v, causal, 0.1, api.default_step()),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager_and_holds_our_op():
    torch._dynamo.reset()
    q, k, v = _qkv(2, 1000, 1000, 8, 2, 128, seed=1)
    model = _Attn(causal=True)
    with torch.no_grad():
        o_eager, lse_eager = model(q, k, v)
        rec = _Recorder()
        o_rec, _ = torch.compile(model, backend=rec, fullgraph=True)(q, k, v)
        torch._dynamo.reset()
        o_ind, lse_ind = torch.compile(model, fullgraph=True)(q, k, v)  # inductor
    assert len(rec.graphs) == 1 and any(t.startswith("fa3_lab.flash_attn_fwd") for t in rec.graphs[0]), rec.graphs
    explain = torch._dynamo.explain(model)(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch.testing.assert_close(o_rec, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(o_ind, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(lse_ind, lse_eager, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_forward_with_grad_and_compiled_backward_match_eager():
    q, k, v = _qkv(1, 256, 256, 4, 2, 64, requires_grad=True)
    with torch.no_grad():
        ref = fa3_lab.flash_attn_func(q, k, v, causal=True)
    out = fa3_lab.flash_attn_func(q, k, v, causal=True, deterministic=True)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: fa3_lab.flash_attn_func(q, k, v, causal=True, deterministic=True),
                             fullgraph=True)
    out_c = compiled(q, k, v)
    torch.testing.assert_close(out_c.detach(), ref, rtol=0, atol=0)
    grads_c = torch.autograd.grad(out_c.float().sum(), (q, k, v))
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=0, atol=0)  # deterministic: bitwise
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_hf_gqa_model_matches_the_float32_model_within_the_stated_tolerance(transformers):
    from fa3_lab.examples import llama_prefill as lp

    models = lp.build_models("cuda", seed=3, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=4096)
    g = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.randint(0, 4096, (2, 1000), device="cuda", generator=g)
    with torch.inference_mode():
        logits = {name: m(ids).logits for name, m in models.items()}
    r = lp.compare_logits(logits["fa3_lab"], logits["sdpa"], logits["fp32"])
    assert r["within_tolerance"], r
    assert r["max_abs_ours_vs_sdpa"] > 0  # two different kernels really ran
    assert r["top1_agreement_ours"] >= r["top1_agreement_sdpa"] - 0.03, r  # argmax near-ties flip either way


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_llama_prefill_example_runs(transformers, tmp_path):
    from rich.console import Console

    from fa3_lab.lab import results
    from fa3_lab.examples import llama_prefill as lp

    doc = lp.run(Console(record=True), batch=1, seqlen=2048, out=tmp_path / "prefill.json", num_hidden_layers=2)
    assert doc["ok"], doc["logits"]
    results.validate(doc)
    assert all(p["ms"] > 0 for p in doc["prefill"].values())
