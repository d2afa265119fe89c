"""fa3_lab.lab.grading: every check passes a correct answer, fails a wrong one with a helpful message, names
an unfinished stub; the CUDA exercise compiles (nvcc) and, on a GPU, matches attention_ref."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from fa3_lab import _env
from fa3_lab.lab import grading, results, sass
from reference._validate import causal_visible
from reference.fa3_pipeline import stage_phase
from reference.flash_forward import forward_tile_step, online_softmax_update
from reference.fp8 import fwht, quantize_per_block
from reference.online_softmax import online_normalizer_update
from reference.pipeline_model import simulate

# ---------------------------------------------------------------- correct answers, written here


def flash_intensity(sq, sk, d, causal, element_bytes=2):
    pairs = int(causal_visible(sq, sk).sum()) if causal else sq * sk
    return float(4 * d * pairs / (element_bytes * d * 2 * (sq + sk)))


def exp_matmul_ratio(d, dtype):
    peak = {"fp16": 989.4, "bf16": 989.4, "e4m3": 1978.9}
    if dtype not in peak:
        raise ValueError(f"dtype: bad {dtype}")
    if d < 1:
        raise ValueError(f"headdim: bad {d}")
    return peak[dtype] / (3.9 * 4 * d)


def merge(m_a, l_a, m_b, l_b):
    m = np.maximum(m_a, m_b)
    ref = np.where(np.isneginf(m), 0.0, m)
    return m, l_a * np.exp(m_a - ref) + l_b * np.exp(m_b - ref)


def n_block_max_causal(m_block, sq, sk, bm, bn):
    cols = np.flatnonzero(causal_visible(sq, sk)[m_block * bm:(m_block + 1) * bm].any(axis=0))
    return 0 if cols.size == 0 else int(cols[-1]) // bn + 1


def ring_position(j, num_stages):
    if j < 0:
        raise ValueError(f"j: negative {j}")
    s, ph = stage_phase(j, num_stages)
    return s, ph, 1 - ph


def may_read(full, j, s):
    return full[j % s].try_wait((j // s) % 2)


def release(empty, j, s):
    empty[j % s].arrive()


def softmax_vs_gemms(d, block_m=128, block_n=128):
    du = simulate("sequential", d, 512, block_m=block_m, block_n=block_n).durations_us
    g = du["gemm0"] + du["gemm1"]
    return du["exp"] / g, du["softmax"] / g


def alg2_consumer(q_i, k_tiles, v_tiles, scale_log2, log):
    rows, d = q_i.shape
    acc, m, l = np.zeros((rows, d)), np.full(rows, -np.inf), np.zeros(rows)
    p_cur, m, l, _ = online_softmax_update(q_i @ k_tiles[0].T, m, l, scale_log2)
    log += ["S0", "softmax0"]
    for j in range(1, len(k_tiles)):
        s_next = q_i @ k_tiles[j].T                   # GEMM0 of j is issued before GEMM1 of j - 1
        pv = p_cur @ v_tiles[j - 1]
        p_cur, m, l, acc_scale = online_softmax_update(s_next, m, l, scale_log2)
        acc = (acc + pv) * acc_scale[:, None]
        log += [f"S{j}", f"PV{j - 1}", f"softmax{j}"]
    log.append(f"PV{len(k_tiles) - 1}")
    return acc + p_cur @ v_tiles[-1], m, l


def acc_index(t, e):
    return 16 * (t // 32) + (t % 32) // 4 + 8 * ((e % 4) // 2), 8 * (e // 4) + 2 * (t % 4) + e % 2


def smem_bytes(d, bm, bn, st, elem_bytes=2):
    n = 1024 + bm * d * elem_bytes + 2 * st * bn * d * elem_bytes + 8 * (1 + 4 * st)
    return n, n <= 232448


def tflops_from_ms(b, h, sq, sk, d, causal, ms):
    return results.flops(b, h, sq, sk, d, causal) / (ms * 1e-3) / 1e12


def overlap_ceiling(d, block_n=128):
    du = simulate("sequential", d, 1024, block_n=block_n).durations_us
    g = du["gemm0"] + du["gemm1"]
    return float((g + du["softmax"]) / max(g, du["softmax"]))


def step_gains(rows, dtype):
    t = {r["impl"]: r["tflops"] for r in rows if r["impl"].startswith("step") and r["dtype"] == dtype}
    if len(t) < 2:
        raise ValueError("rows: fewer than two steps")
    order = sorted(t)
    return {b: t[b] / t[a] for a, b in zip(order, order[1:])}


def preprocess_d(out, dout):
    return np.einsum("bshd,bshd->bhs", dout, out)


def ds_tile(s, dp, lse, d, softmax_scale):
    with np.errstate(invalid="ignore"):
        p = np.nan_to_num(np.exp(softmax_scale * s - lse[:, None]), nan=0.0)
    return p * (dp - d[:, None])


CORRECT = {
    "check_flash_intensity": (flash_intensity,),
    "check_exp_matmul_ratio": (exp_matmul_ratio,),
    "check_online_update": (lambda m, l, x: online_normalizer_update(m, l, x)[:2],),
    "check_merge": (merge,),
    "check_n_block_max_causal": (n_block_max_causal,),
    "check_tile_step": (forward_tile_step,),
    "check_ring_position": (ring_position,),
    "check_consumer_slot": (may_read, release),
    "check_softmax_vs_gemms": (softmax_vs_gemms,),
    "check_alg2_consumer": (alg2_consumer,),
    "check_block_scales": (lambda x, bs: quantize_per_block(x, bs)[1],),
    "check_fwht": (fwht,),
    "check_acc_index": (acc_index,),
    "check_smem_bytes": (smem_bytes,),
    "check_tflops_from_ms": (tflops_from_ms,),
    "check_hgmma_per_group": (sass.gemm_groups,),
    "check_classify_line": (sass.classify,),
    "check_overlap_ceiling": (overlap_ceiling,),
    "check_step_gains": (step_gains,),
    "check_preprocess_d": (preprocess_d,),
    "check_ds_tile": (ds_tile,),
}

# ---------------------------------------------------------------- wrong answers: small, typical slips


def _off_by(fn, delta):
    return lambda *a, **k: fn(*a, **k) + delta


WRONG = {
    "check_flash_intensity": (lambda sq, sk, d, c, element_bytes=2:
                              flash_intensity(sq, sk, d, False, element_bytes) / (2 if c else 1),),  # "half"
    "check_exp_matmul_ratio": (lambda d, dt: 989.4 / (3.9 * 4 * d),),          # forgets FP8; no errors
    "check_online_update": (lambda m, l, x: (np.maximum(m, x.max(-1)), l + np.exp(x - np.maximum(m, x.max(-1))
                                                                                 [:, None]).sum(-1)),),
    "check_merge": (lambda ma, la, mb, lb: (np.maximum(ma, mb), la + lb),),
    "check_n_block_max_causal": (lambda mb, sq, sk, bm, bn: -(-min(sk, (mb + 1) * bm) // bn),),  # top-left
    "check_tile_step": (lambda *a: (lambda m, l, o: (m, l, o * 1.0001))(*forward_tile_step(*a)),),
    "check_ring_position": (lambda j, s: (j % s, (j // s) % 2, (j // s) % 2),),
    "check_consumer_slot": (lambda full, j, s: full[j % s].try_wait(1 - (j // s) % 2), release),
    "check_softmax_vs_gemms": (lambda d, block_m=128, block_n=128: tuple(
        x * 2 for x in softmax_vs_gemms(d, block_m, block_n)),),
    "check_alg2_consumer": (lambda q, k, v, s, log: alg2_consumer(q, k, v, s, []) if not log.append("S0") else 0,),
    "check_block_scales": (lambda x, bs: quantize_per_block(x, bs)[1].astype(np.float64),),
    "check_fwht": (lambda x: np.asarray(x) @ scipy.linalg.hadamard(x.shape[-1]) / x.shape[-1],),
    "check_acc_index": (lambda t, e: (16 * (t // 32) + (t % 32) // 4, 8 * (e // 4) + 2 * (t % 4) + e % 2),),
    "check_smem_bytes": (lambda d, bm, bn, st, elem_bytes=2: smem_bytes(d, bm, bn, st, 2),),
    "check_tflops_from_ms": (lambda b, h, sq, sk, d, c, ms: 4 * b * h * sq * sk * d / (ms * 1e-3) / 1e12,),
    "check_hgmma_per_group": (lambda listing: [sum(i["category"] == "gemm" for i in listing)],),
    "check_classify_line": (lambda text: sass.classify(text.split()[-1]),),
    "check_overlap_ceiling": (_off_by(overlap_ceiling, 0.01),),
    "check_step_gains": (lambda rows, dtype: {r["impl"]: 1.0 for r in rows[1:]},),
    "check_preprocess_d": (lambda out, dout: np.einsum("bshd,bshd->bsh", dout, out),),   # (b, s, h): the wrong layout
    "check_ds_tile": (lambda s, dp, lse, d, a: np.exp(a * s - lse[:, None]) * dp,),     # forgets D
}


def test_every_check_is_tested():
    checks = {n for n in dir(grading) if n.startswith("check_") and n != "check_cuda_exercise"}
    assert checks == set(CORRECT) == set(WRONG)


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_check_passes_a_correct_answer(name, capsys):
    assert getattr(grading, name)(*CORRECT[name]) is None
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: ok") and "fresh random cases (seed " in out, out


@pytest.mark.parametrize("name", sorted(WRONG))
def test_check_fails_a_wrong_answer_helpfully(name):
    with pytest.raises(AssertionError) as info:
        getattr(grading, name)(*WRONG[name])
    msg = str(info.value)
    assert msg.startswith(f"{name}: ") and "(case " in msg, msg
    assert "arguments:" in msg, msg
    assert f"reproduce: fa3_lab.lab.grading.{name}(" in msg and "seed=" in msg, msg


def test_numeric_mismatch_reports_index_and_errors():
    def slightly_off(x):
        y = fwht(x)
        y[..., -1] += 1e-6
        return y

    with pytest.raises(AssertionError) as info:
        grading.check_fwht(slightly_off, seed=5)
    msg = str(info.value)
    assert "first mismatch at index (0, 0, 0)" in msg and "max |error| 1e-06" in msg and "mean |error|" in msg, msg
    assert "entries differ" in msg and "arguments: x=array(" in msg and "seed=5" in msg, msg


def test_stub_raises_not_implemented_naming_the_function():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    for name, fns in CORRECT.items():
        with pytest.raises(NotImplementedError, match="is not written yet.*YOUR CODE HERE"):
            getattr(grading, name)(stub, *fns[1:])
    with pytest.raises(NotImplementedError, match="^tile_step is not written yet"):
        grading.check_tile_step(stub)
    with pytest.raises(NotImplementedError, match="^release is not written yet"):
        grading.check_consumer_slot(may_read, stub)


def test_a_bug_in_the_student_function_carries_the_case():
    def broken(m, l, x):
        raise KeyError("oops")

    with pytest.raises(KeyError) as info:
        grading.check_online_update(broken, seed=3)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "check_online_update: raised by online_update on case 1" in notes
    assert "reproduce: fa3_lab.lab.grading.check_online_update(online_update, seed=3)" in notes


def test_warnings_are_errors():
    def unguarded(m, l, x):                          # -inf - (-inf) on fully masked rows
        m_new = np.maximum(m, x.max(-1))
        return m_new, l * np.exp(m - m_new) + np.exp(x - m_new[:, None]).sum(-1)

    with pytest.raises(AssertionError, match="NumPy warning"):
        grading.check_online_update(unguarded)


def test_inputs_are_fresh_per_seed():
    seen = {}

    def record(seed):
        calls = []

        def fn(sq, sk, d, causal, element_bytes=2):
            calls.append((sq, sk, d, causal, element_bytes))
            return flash_intensity(sq, sk, d, causal, element_bytes)

        grading.check_flash_intensity(fn, seed=seed)
        return calls

    seen[1], seen[2], seen["1 again"] = record(1), record(2), record(1)
    assert seen[1] == seen["1 again"] and seen[1] != seen[2]
    assert len({c[:2] for c in seen[1]}) > 10                 # several shapes


def test_bad_arguments():
    with pytest.raises(TypeError, match="flash_intensity"):
        grading.check_flash_intensity(42)
    with pytest.raises(TypeError, match="seed"):
        grading.check_flash_intensity(flash_intensity, seed=1.5)


def test_accumulator_layout_is_the_ptx_picture():
    thread, reg = grading.accumulator_layout(64)
    pairs = {(t, e) for t, e in zip(thread.ravel(), reg.ravel())}
    assert len(pairs) == thread.size                               # one element per (thread, register)
    assert set(thread.ravel()) == set(range(128)) and reg.max() == 64 // 2 - 1
    rows, cols = np.nonzero(thread == 5)                         # lane 5 of warp 0: rows 1 and 9
    assert set(rows) == {1, 9} and set(cols) == {2, 3, 10, 11, 18, 19, 26, 27, 34, 35, 42, 43, 50, 51, 58, 59}
    assert reg[1, 2] == 0 and reg[1, 3] == 1 and reg[9, 2] == 2 and reg[9, 3] == 3 and reg[1, 10] == 4
    with pytest.raises(ValueError, match="n"):
        grading.accumulator_layout(12)


# ---------------------------------------------------------------- the CUDA exercise

SOLUTION_LINES = ("fast_exp2(fmaf(s[e], p.scale_log2, -offset[r]))", "m_new[r] = quad_max(m_new[r])")


def test_cuda_exercise_source_is_step01_with_one_region():
    text = grading.CUDA_EXERCISE.read_text()
    assert "namespace exercise01 {" in text and "void run_fwd_exercise01(const FwdParams& p" in text
    assert text.count("// ### BEGIN SOLUTION") == 1 and text.count("// ### END SOLUTION") == 1
    assert all(line in text for line in SOLUTION_LINES)
    assert "fa3::run_fwd_exercise01" in grading.EXERCISE_BINDING.read_text()
    assert grading.exercise_source_problems(grading.CUDA_EXERCISE) == []


def test_exercise_source_problems_flags_stub_and_shortcuts(tmp_path):
    from fa3_lab.lab.student import strip_cuda_solution

    student = tmp_path / "student.cu"
    student.write_text(strip_cuda_solution(grading.CUDA_EXERCISE.read_text()))
    assert any("stub" in p for p in grading.exercise_source_problems(student))
    shortcut = tmp_path / "shortcut.cu"
    shortcut.write_text(student.read_text().replace(
        "exercise01_stub(o);", "float corr[2]; softmax.update<kBlockN>(s, p.scale_log2, corr); rescale_rows<kHeadDim>(o, corr);"))
    problems = grading.exercise_source_problems(shortcut)
    assert len(problems) == 2 and "softmax.update" in problems[0] and "rescale_rows" in problems[1]


@pytest.mark.skipif(_env.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("copy", ["solution", "student"])
def test_cuda_exercise_compiles(copy, tmp_path):
    from fa3_lab.lab.student import strip_cuda_solution

    src = grading.CUDA_EXERCISE
    if copy == "student":
        src = tmp_path / src.name
        src.write_text(strip_cuda_solution(grading.CUDA_EXERCISE.read_text()))
    cmd = [str(_env.nvcc()), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-O3",
           f"-I{_env.CUDA_DIR / 'include'}", "-cubin", "-o", str(tmp_path / "x.cubin"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "x.cubin").stat().st_size > 0


def test_build_exercise_refuses_without_gpu_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        grading.build_exercise(tmp_path / "missing.cu")
    if _env.why_no_sm90():
        with pytest.raises(RuntimeError, match="sm_90"):
            grading.build_exercise()


@pytest.mark.gpu
def test_cuda_exercise():
    """The exercise (FA3_EXERCISE=path picks a student's copy) against attention_ref on a few shapes."""
    path = Path(os.environ.get("FA3_EXERCISE", grading.CUDA_EXERCISE))
    problems = grading.exercise_source_problems(path)
    module = grading.build_exercise(path)
    grading.check_cuda_exercise(module)
    assert not problems, problems


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_exercise_stub_fails_clearly(tmp_path):
    from fa3_lab.lab.student import strip_cuda_solution

    student = tmp_path / grading.CUDA_EXERCISE.name
    student.write_text(strip_cuda_solution(grading.CUDA_EXERCISE.read_text()))
    module = grading.build_exercise(student)
    with pytest.raises(AssertionError, match="NaN everywhere.*stub"):
        grading.check_cuda_exercise(module, shapes=grading.CUDA_EXERCISE_SHAPES[:1])


# ---------------------------------------------------------------- check_cuda_exercise's logic, on the CPU


class _StandIn:
    """A built exercise stand-in: attention with torch on the CPU, optionally spoiled."""

    def __init__(self, spoil=None):
        self.spoil = spoil

    def fwd(self, q, k, v, causal, scale, out=None):
        from fa3_lab.torch_ref import attention_ref

        ref, lse = attention_ref(q, k, v, causal, scale)
        out.copy_(ref.to(q.dtype))
        if self.spoil == "nan":
            out.fill_(float("nan"))
        elif self.spoil == "out":
            out[0, -1, 0, 0] += 0.5
        elif self.spoil == "lse":
            lse = lse.clone()
            lse[0, 0, -1] += 0.01
        return out, lse


@pytest.mark.parametrize("spoil, message", [(None, None), ("nan", "NaN everywhere"),
                                            ("out", "out differs from attention_ref"),
                                            ("lse", "lse differs from attention_ref")])
def test_check_cuda_exercise_on_cpu_with_a_stand_in(spoil, message, capsys):
    shapes = grading.CUDA_EXERCISE_SHAPES[:2]
    if message is None:
        grading.check_cuda_exercise(_StandIn(), shapes=shapes, device="cpu", dtype="fp16")
        assert "check_cuda_exercise: ok" in capsys.readouterr().out
        return
    with pytest.raises(AssertionError, match=message) as err:
        grading.check_cuda_exercise(_StandIn(spoil), shapes=shapes, device="cpu")
    assert "reproduce:" in str(err.value)


def test_poisoned_include(tmp_path):
    folder = grading.poisoned_include(tmp_path / "p", ("update", "rescale_rows"))
    text = (folder / "fa3" / "softmax.h").read_text()
    assert f'#include "{(grading.CUDA_DIR / "include" / "fa3" / "softmax.h").resolve()}"' in text
    assert text.rstrip().endswith("#pragma GCC poison update rescale_rows")
    with pytest.raises(ValueError, match="not a C\\+\\+ identifier"):
        grading.poisoned_include(tmp_path / "q", ("update; system(x)",))
