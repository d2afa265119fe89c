"""Grading checks for the notebooks' exercises, and the build of the CUDA exercise.

Every ``check_<function>(fn, *, seed=...)`` runs the student's ``fn`` on FRESH random inputs drawn
from ``np.random.default_rng(seed)`` (several shapes and edge cases per call) and compares it with the
lab's reference (``reference/``, ``fa3_lab.lab.results``, ``fa3_lab.lab.sass``, the pipeline model).

* On success it prints one line — ``check_x: ok — fn matches <reference> on N fresh random cases
  (seed S)`` — and returns None.
* On a wrong answer it raises ``AssertionError`` whose message names the case, the arguments
  (shapes and values), the first mismatching index with both values, the max and mean error and the
  tolerance, and how to reproduce (``fa3_lab.lab.grading.check_x(fn, seed=S)``).
* If ``fn`` still holds the student copy's stub (``raise NotImplementedError()``) it raises
  ``NotImplementedError`` saying which function to write; any other exception of ``fn`` propagates
  with a note naming the arguments that caused it.

The checks, by notebook (exercise numbers as in the committed notebooks):

====  =====================================================================================
00    :func:`check_flash_intensity`, :func:`check_exp_matmul_ratio`
01    :func:`check_online_update`, :func:`check_merge`
02    :func:`check_n_block_max_causal`, :func:`check_tile_step`
03    :func:`check_ring_position`, :func:`check_consumer_slot`
04    :func:`check_softmax_vs_gemms`, :func:`check_alg2_consumer`
05    :func:`check_block_scales`, :func:`check_fwht`
06    :func:`check_acc_index`, :func:`check_smem_bytes`, :func:`check_tflops_from_ms`
07    :func:`check_hgmma_per_group`, :func:`check_classify_line`
08    :func:`check_overlap_ceiling`, :func:`check_step_gains`
CUDA  :func:`build_exercise` + :func:`check_cuda_exercise` (``cuda/exercises/ex01_online_softmax.cu``)
====  =====================================================================================

These are the students' self-checks: they ship with the lab, and an answer that calls the lab's own
reference passes them. The graded truth of a course lives in the kit that ``python -m fa3_lab course``
builds (``fa3_lab/lab/course.py``): hidden tests in the instructor's copy run these checks on inputs
the students never see, with the lab's answers to each exercise unavailable while the student's
function runs, and the CUDA exercise is graded on hidden shapes with the answers poisoned.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from .._env import CUDA_DIR

# H100 SXM5 rates used by notebook 00 (paper §3.1; NVIDIA datasheet), TFLOPs/s.
H100_FP16_TFLOPS = 989.4
H100_FP8_TFLOPS = 1978.9
H100_MUFU_TFLOPS = 3.9
#: Shared memory one CTA may use on an H100/H200 (227 KB), bytes.
MAX_SMEM_PER_BLOCK = 227 * 1024

EXERCISES_DIR = CUDA_DIR / "exercises"
CUDA_EXERCISE = EXERCISES_DIR / "ex01_online_softmax.cu"
EXERCISE_BINDING = EXERCISES_DIR / "exercise_binding.cpp"


# ------------------------------------------------------------------------------------ machinery

def _describe(value) -> str:
    """Short text for an argument: arrays by shape and dtype (plus the values when tiny)."""
    if isinstance(value, np.ndarray):
        text = f"array{value.shape} {value.dtype}"
        if value.size <= 6:
            text += " " + np.array2string(value, precision=6, separator=", ")
        return text
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


class _Grader:
    """State of one check call: which check, which function, the seed, the case being run."""

    def __init__(self, check: str, fn, fn_name: str, seed: int):
        if not callable(fn):
            raise TypeError(f"{check}: expected your function {fn_name} (a callable), got {type(fn).__name__}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"{check}: seed: expected an int, got {type(seed).__name__}")
        self.check, self.fn, self.fn_name, self.seed = check, fn, fn_name, int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.case = 0
        self.args: dict = {}

    # -- the case being run
    def start(self, **args) -> None:
        self.case += 1
        self.args = args

    @property
    def repro(self) -> str:
        return f"reproduce: fa3_lab.lab.grading.{self.check}({self.fn_name}, seed={self.seed})"

    def _arguments(self) -> str:
        return ", ".join(f"{k}={_describe(v)}" for k, v in self.args.items())

    def fail(self, problem: str, detail: str = "") -> AssertionError:
        lines = [f"{self.check}: {problem} (case {self.case})", f"  arguments: {self._arguments()}"]
        if detail:
            lines += ["  " + d for d in detail.splitlines()]
        lines.append(f"  {self.repro}")
        return AssertionError("\n".join(lines))

    def call(self, *args, fn=None, name=None, **kwargs):
        """Call the student's function; the stub's NotImplementedError becomes a clear message."""
        fn, name = (fn, name) if fn is not None else (self.fn, self.fn_name)
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            raise NotImplementedError(
                f"{name} is not written yet: it still raises NotImplementedError (the student copy's "
                f"'# YOUR CODE HERE' stub). Write it in the cell above, run that cell, then run this "
                f"check again.") from None
        except Exception as err:
            err.add_note(f"{self.check}: raised by {name} on case {self.case}: {self._arguments()}\n{self.repro}")
            raise

    # -- comparisons
    def close(self, got, want, what: str, rtol: float = 1e-12, atol: float = 0.0) -> None:
        """``got`` ≈ ``want`` elementwise (infinities must match exactly; NaN never matches)."""
        want = np.asarray(want, dtype=np.float64)
        try:
            got_a = np.asarray(got, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail(f"{self.fn_name} returned {what} that is not numeric: {type(got).__name__}") from None
        if got_a.shape != want.shape:
            raise self.fail(f"{self.fn_name} returned {what} of the wrong shape",
                            f"shape: got {got_a.shape}, expected {want.shape}")
        bad = ~np.isclose(got_a, want, rtol=rtol, atol=atol) | np.isnan(got_a)
        if not bad.any():
            return
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        both = np.isfinite(got_a) & np.isfinite(want)
        err = np.where(both, np.abs(got_a - want), np.where(bad, np.inf, 0.0))
        where = f"index {first}" if got_a.ndim else "the value"
        raise self.fail(
            f"{self.fn_name} returned the wrong {what}",
            f"shape {want.shape}: {int(bad.sum())} of {want.size} entries differ\n"
            f"first mismatch at {where}: got {float(got_a[first])!r}, expected {float(want[first])!r}\n"
            f"max |error| {err.max():.3g}, mean |error| {err.mean():.3g} (rtol {rtol:g}, atol {atol:g})")

    def equal(self, got, want, what: str) -> None:
        """``got == want`` for ints, lists, tuples and dicts (exact)."""
        if got == want:
            return
        detail = f"got      {got!r}\nexpected {want!r}"
        if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            detail += f"\nfirst mismatch at index {first} (lengths: got {len(got)}, expected {len(want)})"
        raise self.fail(f"{self.fn_name} returned the wrong {what}", detail)

    def type_is(self, got, cls: type, what: str) -> None:
        if not isinstance(got, cls) or isinstance(got, bool):
            raise self.fail(f"{self.fn_name} must return {what} as a {cls.__name__}",
                            f"got {type(got).__name__}: {got!r}")

    def raises(self, exc, *args, word: str = "", **kwargs) -> None:
        """The student's function must raise ``exc`` (naming ``word``) on these arguments."""
        try:
            self.fn(*args, **kwargs)
        except NotImplementedError:
            self.call(*args, **kwargs)
        except exc as err:
            if word and word not in str(err):
                raise self.fail(f"{self.fn_name} raised {exc.__name__} without naming the argument '{word}'",
                                f"message: {err}") from None
            return
        except Exception as err:
            raise self.fail(f"{self.fn_name} raised {type(err).__name__} instead of {exc.__name__}",
                            f"message: {err}") from None
        raise self.fail(f"{self.fn_name} must raise {exc.__name__} here, and returned normally")

    def ok(self, reference: str) -> None:
        print(f"{self.check}: ok — {self.fn_name} matches {reference} on {self.case} fresh random cases "
              f"(seed {self.seed})")


class _Strict:
    """Context: NumPy warnings (overflow, invalid value, …) become errors, as in the notebooks."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")
        self._e = np.errstate(all="raise")
        self._e.__enter__()

    def __exit__(self, *exc):
        self._e.__exit__(*exc)
        self._w.__exit__(*exc)
        return False


def _strict_call(g: _Grader, *args, **kwargs):
    try:
        with _Strict():
            return g.call(*args, **kwargs)
    except (FloatingPointError, RuntimeWarning) as err:
        raise g.fail(f"{g.fn_name} produced a NumPy warning/NaN path ({type(err).__name__}: {err})",
                     "a row whose scores are all -inf must not compute -inf - (-inf): guard the max "
                     "with np.where(m == -np.inf, 0.0, m)") from None


# ------------------------------------------------------------------------------ notebook 00

def check_flash_intensity(flash_intensity, *, seed: int = 2024, cases: int = 25) -> None:
    """Notebook 00, exercise 1: FLOPs per byte of the ideal tiled forward, one head.

    Expected: ``4·headdim·pairs / (element_bytes·headdim·2·(seqlen_q + seqlen_k))`` as a Python float,
    pairs = seqlen_q·seqlen_k, or the exact count of the bottom-right causal mask
    (``reference._validate.causal_visible``). Source: paper §2.3; docs/design.md "Numbers everyone uses".

    Raises:
        AssertionError: a wrong value or type (message: case, arguments, error, how to reproduce).
        NotImplementedError: ``flash_intensity`` is still the stub.
    """
    from reference._validate import causal_visible

    g = _Grader("check_flash_intensity", flash_intensity, "flash_intensity", seed)
    sizes = [(1, 1), (1, 300), (300, 1), (128, 128)]
    sizes += [tuple(int(x) for x in g.rng.integers(1, 400, size=2)) for _ in range(cases - len(sizes))]
    for sq, sk in sizes:
        d, eb = int(g.rng.choice([64, 128, 256])), int(g.rng.choice([1, 2]))
        for causal in (False, True):
            g.start(seqlen_q=sq, seqlen_k=sk, headdim=d, causal=causal, element_bytes=eb)
            pairs = int(causal_visible(sq, sk).sum()) if causal else sq * sk
            want = 4 * d * pairs / (eb * d * 2 * (sq + sk))
            got = g.call(sq, sk, d, causal, element_bytes=eb)
            g.type_is(got, float, "the intensity")
            g.close(got, want, "intensity")
    g.ok("the exact mask count")


def check_exp_matmul_ratio(exp_matmul_ratio, *, seed: int = 7, cases: int = 20) -> None:
    """Notebook 00, exercise 2: t_exp / t_matmul per element of S on an H100 (paper §3.1, ~0.5 at d=128).

    Expected: ``peak(dtype) / (3.9 · 4 · headdim)`` with peak 989.4 (fp16, bf16) or 1978.9 (e4m3);
    ``ValueError`` naming ``dtype`` or ``headdim`` for any other dtype or headdim < 1.

    Raises:
        AssertionError: a wrong ratio or a missing/incorrect error.
        NotImplementedError: ``exp_matmul_ratio`` is still the stub.
    """
    g = _Grader("check_exp_matmul_ratio", exp_matmul_ratio, "exp_matmul_ratio", seed)
    peaks = {"fp16": H100_FP16_TFLOPS, "bf16": H100_FP16_TFLOPS, "e4m3": H100_FP8_TFLOPS}
    for d in [1, 128] + [int(x) for x in g.rng.integers(1, 512, size=cases - 2)]:
        for dtype, peak in peaks.items():
            g.start(headdim=d, dtype=dtype)
            g.close(g.call(d, dtype), peak / (H100_MUFU_TFLOPS * 4 * d), "ratio", rtol=1e-9)
    g.start(headdim=128, dtype="fp32")
    g.raises(ValueError, 128, "fp32", word="dtype")
    g.start(headdim=0, dtype="fp16")
    g.raises(ValueError, 0, "fp16", word="headdim")
    g.ok("peak / (3.9 TFLOPs/s · 4·headdim)")


# ------------------------------------------------------------------------------ notebook 01

def _masked_rows(rng, rows: int, n: int) -> np.ndarray:
    """(rows, n) float64 scores, some −inf, row 0 with a masked prefix (maybe all of it)."""
    xs = rng.standard_normal((rows, n)) * rng.choice([1.0, 50.0])
    xs[rng.random((rows, n)) < 0.3] = -np.inf
    xs[0, : rng.integers(0, n + 1)] = -np.inf
    return xs


def check_online_update(online_update, *, seed: int = 101, cases: int = 20) -> None:
    """Notebook 01, exercise 1: fold one block of scores into the running (m, ℓ) of many rows.

    Compared block by block with ``reference.online_softmax.online_normalizer_update`` (Milakov &
    Gimelshein 2018, Alg. 3 lines 4–5), fed the reference's state so errors do not pile up: m exactly,
    ℓ to rtol 1e-13; fully masked rows must stay (−inf, 0) without a NumPy warning.

    Raises:
        AssertionError: a wrong (m, ℓ), a shape error, or a warning (−inf − (−inf)).
        NotImplementedError: ``online_update`` is still the stub.
    """
    from reference.online_softmax import online_normalizer_update

    g = _Grader("check_online_update", online_update, "online_update", seed)
    for _ in range(cases):
        rows, n, block = (int(x) for x in g.rng.integers(1, [9, 40, 12]))
        xs = _masked_rows(g.rng, rows, n)
        m, l = np.full(rows, -np.inf), np.zeros(rows)
        for start in range(0, n, block):
            x_block = xs[:, start:start + block]
            g.start(m_prev=m, l_prev=l, x_block=x_block, block_start=start)
            got = _strict_call(g, m.copy(), l.copy(), x_block.copy())
            if not (isinstance(got, tuple) and len(got) == 2):
                raise g.fail(f"{g.fn_name} must return a tuple (m_new, l_new)", f"got {type(got).__name__}")
            m_ref, l_ref, _ = online_normalizer_update(m, l, x_block)
            g.close(got[0], m_ref, "m_new (running max)", rtol=0)
            g.close(got[1], l_ref, "l_new (running sum)", rtol=1e-13)
            m, l = m_ref, l_ref
    g.ok("reference.online_softmax.online_normalizer_update")


def check_merge(merge, *, seed: int = 202, cases: int = 20) -> None:
    """Notebook 01, exercise 2: combine the (m, ℓ) of two halves of each row (split-KV merge).

    Expected: the (m, ℓ) of ``reference.online_softmax.online_softmax_stats`` on the whole row, for
    ``merge(a, b)`` and ``merge(b, a)``; empty sides (m = −∞, ℓ = 0) without a NumPy warning.

    Raises:
        AssertionError: a wrong (m, ℓ) or a warning. NotImplementedError: ``merge`` is still the stub.
    """
    from reference.online_softmax import online_softmax_stats

    g = _Grader("check_merge", merge, "merge", seed)
    for _ in range(cases):
        rows, n = int(g.rng.integers(1, 6)), int(g.rng.integers(2, 40))
        xs = g.rng.standard_normal((rows, n)) * 20
        xs[g.rng.random((rows, n)) < 0.4] = -np.inf
        xs[0] = -np.inf                                              # one row fully masked
        cut = int(g.rng.integers(1, n))
        a, b = online_softmax_stats(xs[:, :cut], 3), online_softmax_stats(xs[:, cut:], 5)
        m_ref, l_ref = online_softmax_stats(xs, n)
        for name, (x, y) in (("a, b", (a, b)), ("b, a", (b, a))):
            g.start(order=name, m_a=x[0], l_a=x[1], m_b=y[0], l_b=y[1], cut=cut, n=n)
            got = _strict_call(g, *x, *y)
            g.close(got[0], m_ref, "m (max of the whole row)", rtol=0)
            g.close(got[1], l_ref, "l (sum of the whole row)", rtol=1e-13)
    g.ok("online_softmax_stats of the whole row")


# ------------------------------------------------------------------------------ notebook 02

def check_n_block_max_causal(n_block_max_causal, *, seed: int = 404, cases: int = 200) -> None:
    """Notebook 02, exercise 1: K/V tiles a Q tile must visit under the bottom-right causal mask.

    Expected: 1 + the tile of the last key any row of Q tile ``m_block`` sees (0 if none), from the
    mask ``reference._validate.causal_visible``; a Python int.

    Raises:
        AssertionError: a wrong count or type. NotImplementedError: still the stub.
    """
    from reference._validate import causal_visible

    g = _Grader("check_n_block_max_causal", n_block_max_causal, "n_block_max_causal", seed)
    sizes = [(1, 1, 1, 1), (200, 5, 64, 2), (5, 200, 2, 64), (128, 128, 128, 128)]
    sizes += [tuple(int(x) for x in g.rng.integers(1, 160, size=4)) for _ in range(cases - len(sizes))]
    for sq, sk, bm, bn in sizes:
        visible = causal_visible(sq, sk)
        for m_block in range(-(-sq // bm)):
            g.start(m_block=m_block, seqlen_q=sq, seqlen_k=sk, block_m=bm, block_n=bn)
            cols = np.flatnonzero(visible[m_block * bm:(m_block + 1) * bm].any(axis=0))
            want = 0 if cols.size == 0 else int(cols[-1]) // bn + 1
            got = g.call(m_block, sq, sk, bm, bn)
            if type(got) is not int:
                raise g.fail(f"{g.fn_name} must return a Python int", f"got {type(got).__name__}: {got!r}")
            g.equal(got, want, "number of K/V tiles")
    g.ok("the causal mask")


def check_tile_step(tile_step, *, seed: int = 303, cases: int = 12) -> None:
    """Notebook 02, exercise 2: one iteration of the tiled forward's inner loop (paper Alg. 1 l. 17–21).

    The check drives ``tile_step`` over every (Q tile, K/V tile) of fresh random problems (GQA,
    causal and not, seqlen_q ≠ seqlen_k, odd tile sizes), in the kernel's order (last K/V tile
    first), feeding it the reference state and comparing ``(m_i, l_i, acc_o)`` with
    ``reference.flash_forward.forward_tile_step`` (rtol 1e-10). It also requires that the inputs are
    not modified and that no NumPy warning is raised.

    Raises:
        AssertionError: a wrong output (names head, m_block, n_block), modified inputs, a warning.
        NotImplementedError: ``tile_step`` is still the stub.
    """
    from reference.flash_forward import forward_tile_step, kLog2e, n_block_range, tile_visible

    g = _Grader("check_tile_step", tile_step, "tile_step", seed)
    steps = 0
    for trial in range(cases):
        sq, sk = (int(x) for x in g.rng.integers(1, 90, size=2))
        nheads_kv, d = int(g.rng.choice([1, 2])), int(g.rng.choice([8, 32]))
        bm, bn = (int(x) for x in g.rng.integers(1, 40, size=2))
        causal = bool(trial % 2) or sq > sk
        q = g.rng.standard_normal((sq, 2 * nheads_kv, d))
        k, v = g.rng.standard_normal((2, sk, nheads_kv, d))
        scale_log2 = kLog2e / np.sqrt(d)
        for h in range(2 * nheads_kv):
            for m_block in range(-(-sq // bm)):
                q_i = q[m_block * bm:(m_block + 1) * bm, h]
                m_i, l_i, acc_o = np.full(len(q_i), -np.inf), np.zeros(len(q_i)), np.zeros((len(q_i), d))
                lo, hi = n_block_range(m_block, sq, sk, bm, bn, causal)
                for n_block in range(hi - 1, lo - 1, -1):
                    cols = slice(n_block * bn, (n_block + 1) * bn)
                    vis = tile_visible(m_block, n_block, sq, sk, bm, bn, causal)
                    args = (q_i, k[cols, h // 2], v[cols, h // 2], m_i, l_i, acc_o)
                    frozen = [a.copy() for a in args]
                    g.start(seqlen_q=sq, seqlen_k=sk, headdim=d, block_m=bm, block_n=bn, causal=causal,
                            head=h, m_block=m_block, n_block=n_block, m_i=m_i, l_i=l_i)
                    got = _strict_call(g, *args, scale_log2, vis)
                    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(args, frozen)):
                        raise g.fail(f"{g.fn_name} modified an array passed in (m_i, l_i or acc_o)",
                                     "return new arrays: m_new = np.maximum(...), acc_o * rescale + ...")
                    want = forward_tile_step(*frozen, scale_log2, vis)
                    if not (isinstance(got, tuple) and len(got) == 3):
                        raise g.fail(f"{g.fn_name} must return (m_i, l_i, acc_o)", f"got {type(got).__name__}")
                    for name, a, b in zip(("m_i", "l_i", "acc_o"), got, want):
                        g.close(a, b, name, rtol=1e-10, atol=1e-12)
                    m_i, l_i, acc_o = want
                    steps += 1
    g.ok("reference.flash_forward.forward_tile_step")


# ------------------------------------------------------------------------------ notebook 03

def check_ring_position(ring_position, *, seed: int = 31, cases: int = 200) -> None:
    """Notebook 03, exercise 1: ring slot and parities of K/V tile j (paper Alg. 1; CUTLASS PipelineState).

    Expected: ``(j % s, (j // s) % 2, 1 − that)`` — checked against
    ``reference.fa3_pipeline.stage_phase`` and by driving real ``MBarrier`` objects; ``ValueError``
    naming ``j`` for j < 0.

    Raises:
        AssertionError: a wrong triple, a parity that would read early or miss a load, no ValueError.
        NotImplementedError: still the stub.
    """
    from reference.fa3_pipeline import MBarrier, stage_phase

    g = _Grader("check_ring_position", ring_position, "ring_position", seed)
    for _ in range(cases):
        stages, j = int(g.rng.integers(1, 6)), int(g.rng.integers(0, 200))
        g.start(j=j, num_stages=stages)
        s, phase = stage_phase(j, stages)
        got = g.call(j, stages)
        g.equal(tuple(got) if isinstance(got, (tuple, list)) else got, (s, phase, phase ^ 1),
                "(stage, consumer_parity, producer_parity)")
    for stages in (1, 2, 3):
        fulls = [MBarrier(1) for _ in range(stages)]
        for j in range(12):
            g.start(j=j, num_stages=stages)
            s, c_par, _ = g.call(j, stages)
            if fulls[s].try_wait(c_par):
                raise g.fail("a consumer waiting with your parity would read the slot before the load landed")
            fulls[s].arrive()
            if not fulls[s].try_wait(c_par):
                raise g.fail("a consumer waiting with your parity would miss the load (wait forever)")
    g.start(j=-1, num_stages=2)
    g.raises(ValueError, -1, 2, word="j")
    g.ok("stage_phase and real mbarriers")


def check_consumer_slot(may_read, release, *, seed: int = 77, cases: int = 30) -> None:
    """Notebook 03, exercise 2: the consumer's ``may_read(full, j, s)`` and ``release(empty, j, s)``.

    A random interleaving of one producer and two consumers over a ring of ``MBarrier`` s (the
    check keeps the truth: which tile each slot holds). ``may_read`` must answer True exactly when
    slot ``j % s`` holds tile j and must not change a barrier; ``release`` must arrive exactly once
    on ``empty[j % s]``.

    Raises:
        AssertionError: a wrong answer, a changed barrier, a wrong number of arrivals.
        NotImplementedError: one of the two is still the stub.
    """
    from reference.fa3_pipeline import MBarrier

    g = _Grader("check_consumer_slot", may_read, "may_read", seed)
    consumers = 2
    for _ in range(cases):
        stages, tiles = int(g.rng.integers(1, 4)), int(g.rng.integers(1, 10))
        full = [MBarrier(1) for _ in range(stages)]
        empty = [MBarrier(consumers) for _ in range(stages)]
        holds = [None] * stages
        next_load, next_read = 0, [0] * consumers
        while min(next_read) < tiles:
            who = int(g.rng.integers(0, consumers + 1))
            if who == consumers:                                       # the producer
                j = next_load
                if j < tiles and empty[j % stages].try_wait(((j // stages) % 2) ^ 1):
                    full[j % stages].arrive()
                    holds[j % stages] = j
                    next_load += 1
                continue
            j = next_read[who]
            if j >= tiles:
                continue
            s = j % stages
            g.start(num_stages=stages, tiles=tiles, consumer=who, j=j, slot_holds_tile=holds[s])
            before = [(b.phase, b.pending) for b in full + empty]
            ok = g.call(full, j, stages)
            if [(b.phase, b.pending) for b in full + empty] != before:
                raise g.fail("may_read changed a barrier; use only try_wait")
            if bool(ok) != (holds[s] == j):
                raise g.fail(f"may_read returned {ok!r}, expected {holds[s] == j}",
                             f"slot {s} holds tile {holds[s]}, full[{s}] = {full[s]!r}")
            if ok:
                pending = empty[s].pending
                g.call(empty, j, stages, fn=release, name="release")
                if empty[s].pending != (pending - 1 or consumers):
                    raise g.fail("release must arrive exactly once on empty[j % num_stages]",
                                 f"pending arrivals before {pending}, after {empty[s].pending}")
                next_read[who] += 1
    g.ok("a simulated producer/consumer ring")


# ------------------------------------------------------------------------------ notebook 04

def check_softmax_vs_gemms(softmax_vs_gemms, *, seed: int = 404, cases: int = 15) -> None:
    """Notebook 04, exercise 1: (exp / GEMMs, softmax / GEMMs) of one consumer warpgroup and K/V tile.

    Expected: the ratios of the one-SM model's own durations,
    ``reference.pipeline_model.simulate("sequential", d, 512, block_m, block_n).durations_us``
    (``exp`` and ``softmax`` over ``gemm0 + gemm1``), rtol 1e-9.

    Raises:
        AssertionError: a wrong ratio. NotImplementedError: still the stub.
    """
    from reference.pipeline_model import simulate

    g = _Grader("check_softmax_vs_gemms", softmax_vs_gemms, "softmax_vs_gemms", seed)
    shapes = [(64, 128, 128), (128, 128, 128), (256, 128, 80)]
    shapes += [(int(g.rng.integers(16, 300)), 2 * int(g.rng.integers(16, 97)), int(g.rng.integers(16, 200)))
               for _ in range(cases - len(shapes))]
    for d, bm, bn in shapes:
        g.start(headdim=d, block_m=bm, block_n=bn)
        du = simulate("sequential", d, 512, block_m=bm, block_n=bn).durations_us
        gemms = du["gemm0"] + du["gemm1"]
        got = g.call(d, block_m=bm, block_n=bn)
        g.close(got, [du["exp"] / gemms, du["softmax"] / gemms], "(exp_over_gemms, softmax_over_gemms)",
                rtol=1e-9)
    g.ok("the pipeline model's durations")


def check_alg2_consumer(alg2_consumer, *, seed: int = 2026, cases: int = 20) -> None:
    """Notebook 04, exercise 2: one consumer's loop in Algorithm 2's order (paper §3.2, Alg. 2).

    Expected: the unnormalized ``(acc_o, m_i, l_i)`` of the sequential tiled loop
    (``reference.flash_forward.forward_tile_step`` tile after tile, rtol 1e-10), and the log
    ``S0, softmax0, S1, PV0, softmax1, …, PV{T-1}``.

    Raises:
        AssertionError: a wrong result or a wrong issue order. NotImplementedError: still the stub.
    """
    from reference.flash_forward import forward_tile_step, kLog2e

    g = _Grader("check_alg2_consumer", alg2_consumer, "alg2_consumer", seed)
    for _ in range(cases):
        rows, d, bn, T = (int(x) for x in g.rng.integers([1, 4, 1, 1], [40, 65, 33, 7]))
        q_i = g.rng.standard_normal((rows, d))
        k_tiles = [g.rng.standard_normal((bn, d)) for _ in range(T)]
        v_tiles = [g.rng.standard_normal((bn, d)) for _ in range(T)]
        scale_log2 = float(g.rng.uniform(0.05, 0.5)) * kLog2e
        g.start(rows=rows, headdim=d, block_n=bn, tiles=T, scale_log2=scale_log2)
        log: list = []
        got = g.call(q_i, k_tiles, v_tiles, scale_log2, log)
        m, l, acc = np.full(rows, -np.inf), np.zeros(rows), np.zeros((rows, d))
        for k_j, v_j in zip(k_tiles, v_tiles):
            m, l, acc = forward_tile_step(q_i, k_j, v_j, m, l, acc, scale_log2)
        for name, a, b in zip(("acc_o", "m_i", "l_i"), got, (acc, m, l)):
            g.close(a, b, name, rtol=1e-10, atol=1e-12)
        want = ["S0", "softmax0"]
        for j in range(1, T):
            want += [f"S{j}", f"PV{j - 1}", f"softmax{j}"]
        g.equal(log, want + [f"PV{T - 1}"], "log (issue order of Algorithm 2)")
    g.ok("the sequential tiled loop and Algorithm 2's issue order")


# ------------------------------------------------------------------------------ notebook 05

def check_block_scales(block_scales, *, seed: int = 505, cases: int = 20) -> None:
    """Notebook 05, exercise 1: per-block e4m3 scales of a BSHD tensor (paper §3.3, block quantization).

    Expected: the scales of ``reference.fp8.quantize_per_block`` — (batch, nheads, ⌈seqlen/bs⌉)
    float32, amax/448, 1 for a block of zeros — on tensors with outliers and all-zero blocks.

    Raises:
        AssertionError: a wrong scale, shape or dtype. NotImplementedError: still the stub.
    """
    from reference.fp8 import quantize_per_block

    g = _Grader("check_block_scales", block_scales, "block_scales", seed)
    for _ in range(cases):
        b, s, h, bs = (int(n) for n in g.rng.integers(1, [3, 300, 4, 130]))
        x = g.rng.standard_normal((b, s, h, 16)) * np.exp(g.rng.normal(0, 2, (b, 1, h, 1)))
        x[g.rng.random(x.shape) < 0.002] *= 100.0
        if s > bs:
            x[:, :bs, 0] = 0.0                                       # a block of zeros
        g.start(x=x, block_size=bs)
        got = g.call(x.copy(), bs)
        _, want = quantize_per_block(x, bs)
        if getattr(got, "dtype", None) != np.float32:
            raise g.fail(f"{g.fn_name} must return float32 scales", f"got dtype {getattr(got, 'dtype', type(got))}")
        g.close(got, want, "scale", rtol=1e-7)
    g.ok("reference.fp8.quantize_per_block")


def check_fwht(my_fwht, *, seed: int = 506) -> None:
    """Notebook 05, exercise 2: the orthonormal fast Walsh–Hadamard transform (paper §3.3).

    Expected: ``x @ scipy.linalg.hadamard(d) / √d`` (= ``reference.fp8.fwht``), float64, for d = 1 …
    256 and several leading shapes; applying it twice gives x back.

    Raises:
        AssertionError: a wrong transform, shape or dtype. NotImplementedError: still the stub.
    """
    import scipy.linalg

    g = _Grader("check_fwht", my_fwht, "my_fwht", seed)
    for log_d in range(0, 9):
        d = 2**log_d
        for lead in ((int(g.rng.integers(1, 4)), 5), (3,)):
            x = g.rng.standard_normal((*lead, d))
            g.start(x=x)
            got = g.call(x.copy())
            if getattr(got, "dtype", None) != np.float64:
                raise g.fail(f"{g.fn_name} must return float64", f"got {getattr(got, 'dtype', type(got))}")
            g.close(got, x @ scipy.linalg.hadamard(d) / np.sqrt(d), "transform", rtol=0, atol=1e-12)
            g.start(x="my_fwht(x) of the case above (the transform is its own inverse)")
            g.close(g.call(got), x, "inverse (my_fwht applied twice)", rtol=0, atol=1e-12)
    g.ok("x @ hadamard(d) / sqrt(d)")


# ------------------------------------------------------------------------------ notebook 06

def accumulator_layout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Owner thread and register of every element of a 64 × n fp32 WGMMA accumulator (n % 8 == 0).

    Built from the PTX ISA's picture (§9.7.15.5.1, "wgmma D fragment"): warp w owns rows 16w…16w+15;
    each 8-column chunk c is two 8×8 core matrices (rows +0 and +8) in which lane l holds row l/4,
    columns 2·(l % 4) and +1; a thread's registers run chunk by chunk: (r, c), (r, c+1), (r+8, c),
    (r+8, c+1).

    Returns:
        (thread, reg): two (64, n) int arrays.

    Raises:
        ValueError: n is not a positive multiple of 8.
    """
    if not isinstance(n, (int, np.integer)) or n < 8 or n % 8:
        raise ValueError(f"n: expected a positive multiple of 8, got {n!r}")
    thread, reg = np.zeros((64, n), int), np.zeros((64, n), int)
    for t in range(128):
        warp, lane = divmod(t, 32)
        for chunk in range(n // 8):
            for half in range(2):                          # core matrix of rows +0 / +8
                for pair in range(2):                      # the two adjacent columns
                    r, c = 16 * warp + lane // 4 + 8 * half, 8 * chunk + 2 * (lane % 4) + pair
                    thread[r, c], reg[r, c] = t, 4 * chunk + 2 * half + pair
    return thread, reg


def check_acc_index(acc_index, *, seed: int = 2606, cases: int = 5) -> None:
    """Notebook 06, exercise 1: (row, col) of accumulator register e of thread t, vectorized.

    Expected: agreement with :func:`accumulator_layout` for random N (multiples of 8 up to 256) and
    200 random (thread, register) pairs each, given as NumPy arrays (broadcasting), and for ints.

    Raises:
        AssertionError: a wrong (row, col) or no broadcasting. NotImplementedError: still the stub.
    """
    g = _Grader("check_acc_index", acc_index, "acc_index", seed)
    for _ in range(cases):
        n = 8 * int(g.rng.integers(1, 33))
        thread, reg = accumulator_layout(n)
        rows_all, cols_all = np.indices((64, n)).reshape(2, -1)
        pick = g.rng.integers(0, rows_all.size, size=200)
        t, e = thread.ravel()[pick], reg.ravel()[pick]
        g.start(N=n, t=t, e=e)
        got = g.call(t, e)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise g.fail(f"{g.fn_name} must return (row, col)", f"got {type(got).__name__}")
        g.close(got[0], rows_all[pick], "row", rtol=0)
        g.close(got[1], cols_all[pick], "col", rtol=0)
        ti, ei = int(t[0]), int(e[0])
        g.start(N=n, t=ti, e=ei)
        g.equal(tuple(int(x) for x in g.call(ti, ei)), (int(rows_all[pick[0]]), int(cols_all[pick[0]])),
                "(row, col) for plain ints")
    g.ok("the accumulator layout built from the PTX core matrices")


def check_smem_bytes(smem_bytes, *, seed: int = 2607, cases: int = 50) -> None:
    """Notebook 06, exercise 2: shared memory of step 02's configuration and whether it fits.

    Expected: ``kSmemBytes = 1024 + Br·d·e + 2·stages·Bc·d·e + 8·(1 + 4·stages)`` (as in
    ``cuda/steps/02_warp_specialized.cu``, checked to still say so when the file is present) and
    ``fits = bytes <= 232448``.

    Raises:
        AssertionError: a wrong byte count or verdict. NotImplementedError: still the stub.
    """
    g = _Grader("check_smem_bytes", smem_bytes, "smem_bytes", seed)
    src = CUDA_DIR / "steps" / "02_warp_specialized.cu"
    if src.exists():
        text = " ".join(re.sub(r"/\*.*?\*/", "", src.read_text()).split())  # comments out, spaces folded
        for line in ("kSmemBytes = 1024 + kQBytes + 2 * kStages * kKVBytes + kBarrierBytes",
                     "kBarrierBytes = 8 * (1 + 4 * kStages)"):
            if line not in text:
                raise AssertionError(f"check_smem_bytes: {src} no longer says '{line}'; update fa3_lab/grading.py")
    choices = ((64, 96, 128, 192, 256), (64, 128, 192), (16, 64, 80, 128, 176), (1, 2, 3, 4), (1, 2))
    for _ in range(cases):
        d, bm, bn, st, eb = (int(g.rng.choice(c)) for c in choices)
        g.start(headdim=d, block_m=bm, block_n=bn, stages=st, elem_bytes=eb)
        want = 1024 + bm * d * eb + 2 * st * bn * d * eb + 8 * (1 + 4 * st)
        got = g.call(d, bm, bn, st, elem_bytes=eb)
        g.equal(tuple(got) if isinstance(got, (tuple, list)) else got, (want, want <= MAX_SMEM_PER_BLOCK),
                "(bytes, fits)")
    g.ok("step 02's kSmemBytes")


def check_tflops_from_ms(tflops_from_ms, *, seed: int = 2608, cases: int = 50, rows=None) -> None:
    """Notebook 06, exercise 3: TFLOPs/s of a forward run from its milliseconds.

    Expected: ``fa3_lab.lab.results.flops(...) / (ms · 1e-3) / 1e12`` (exact causal pair count), rtol
    1e-12, on fresh random shapes; and, if ``rows`` (results-schema rows) are given, each row's
    recorded ``tflops`` to 1%.

    Raises:
        AssertionError: a wrong rate. NotImplementedError: still the stub.
    """
    from . import results

    g = _Grader("check_tflops_from_ms", tflops_from_ms, "tflops_from_ms", seed)
    for row in rows or ():
        args = [row[k] for k in ("batch", "nheads", "seqlen_q", "seqlen_k", "headdim", "causal", "ms")]
        g.start(**{k: row[k] for k in ("impl", "batch", "nheads", "seqlen_q", "seqlen_k", "headdim", "causal",
                                       "ms")})
        g.close(g.call(*args), row["tflops"], "TFLOPs/s (recorded row)", rtol=0.01)
    for _ in range(cases):
        b, h, sq, sk, d = (int(x) for x in g.rng.integers(1, [5, 9, 700, 700, 257]))
        causal, ms = bool(g.rng.integers(0, 2)), float(g.rng.uniform(0.01, 5))
        g.start(batch=b, nheads=h, seqlen_q=sq, seqlen_k=sk, headdim=d, causal=causal, ms=ms)
        want = results.flops(b, h, sq, sk, d, causal) / (ms * 1e-3) / 1e12
        g.close(g.call(b, h, sq, sk, d, causal, ms), want, "TFLOPs/s")
    g.ok("fa3_lab.lab.results.flops")


# ------------------------------------------------------------------------------ notebook 07

_SASS_VOCAB = ["MUFU.EX2 R2, R2", "FFMA R3, R4, R5, R6", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
               "BAR.ARV R4, 0x100", "FMNMX R3, R4, R5, !PT"]
_SASS_OPS = ["HGMMA.64x64x16.F32.F16 R24, gdesc[UR4], R24, gsb0", "MUFU.EX2 R1, R1", "MUFU.RCP R1, R1",
             "MUFU.LG2 R0, R2", "STL.64 [R1+0x8], R2", "LDL R2, [R1]", "SYNCS.ARRIVE.TRANS64 RZ, [UR4], R2",
             "BAR.SYNC.DEFER_BLOCKING 0x0", "FMNMX R1, R2, R3, PT", "FFMA.FTZ R1, R2, R3, R4", "BRA 0x100",
             "IMAD R1, R2, R3, R4", "FADD R1, R2, -R3", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "WARPGROUP.ARRIVE",
             "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24", "LDS.128 R4, [R2]", "EXIT"]


def check_hgmma_per_group(hgmma_per_group, *, seed: int = 7, cases: int = 200) -> None:
    """Notebook 07, exercise 1: GEMM issues per committed group of a SASS listing.

    Expected: ``fa3_lab.lab.sass.gemm_groups`` on random listings (HGMMA/QGMMA with and without ``gsb0``
    mixed with other instructions) and on the recorded step 02/04 loops.

    Raises:
        AssertionError: a wrong list. NotImplementedError: still the stub.
    """
    from . import sass

    g = _Grader("check_hgmma_per_group", hgmma_per_group, "hgmma_per_group", seed)
    for _ in range(cases):
        listing = []
        for _ in range(int(g.rng.integers(1, 40))):
            if g.rng.random() < 0.5:
                text = ("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24" if g.rng.random() < 0.3 else
                        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24") + (", gsb0" if g.rng.random() < 0.3 else "")
            else:
                text = _SASS_VOCAB[int(g.rng.integers(len(_SASS_VOCAB)))]
            listing.append({"text": text, "category": sass.classify(text)})
        g.start(listing=[ins["text"] for ins in listing])
        g.equal(g.call(listing), sass.gemm_groups(listing), "list of group sizes")
    try:
        rec = sass.load_recorded()
    except (OSError, ValueError):
        rec = None
    for step, r in (rec or {}).get("steps", {}).items():
        g.start(listing=f"recorded step {step} main loop")
        g.equal(g.call(r["listing"]), sass.gemm_groups(r["listing"]), f"list of group sizes of step {step}")
    g.ok("fa3_lab.lab.sass.gemm_groups")


def check_classify_line(classify_line, *, seed: int = 11, cases: int = 300) -> None:
    """Notebook 07, exercise 2: the category of one SASS line, predicate allowed.

    Expected: ``fa3_lab.lab.sass.classify`` on every line of the recorded loops and on random lines with
    predicates ``@P0``, ``@!P1``, ``@!UP0`` …

    Raises:
        AssertionError: a wrong category. NotImplementedError: still the stub.
    """
    from . import sass

    g = _Grader("check_classify_line", classify_line, "classify_line", seed)
    lines = []
    try:
        rec = sass.load_recorded()
        lines += [ins["text"] for r in rec["steps"].values() for ins in r["listing"]]
    except (OSError, ValueError, KeyError):
        pass
    for _ in range(cases):
        pred = ["", "@P0 ", "@!P1 ", "@!UP0 ", "@P6 "][int(g.rng.integers(5))]
        lines.append(pred + _SASS_OPS[int(g.rng.integers(len(_SASS_OPS)))])
    for text in lines:
        g.start(text=text)
        g.equal(g.call(text), sass.classify(text), "category")
    g.ok("fa3_lab.lab.sass.classify")


# ------------------------------------------------------------------------------ notebook 08

def check_overlap_ceiling(overlap_ceiling, *, seed: int = 809, cases: int = 10) -> None:
    """Notebook 08, exercise 1: the most hiding the softmax under the GEMMs can buy.

    Expected: ``(g + s) / max(g, s)`` with g = gemm0 + gemm1 and s = softmax from
    ``reference.pipeline_model.simulate("sequential", headdim, 1024, block_n=...).durations_us``;
    a float ≥ 1.

    Raises:
        AssertionError: a wrong ratio or type. NotImplementedError: still the stub.
    """
    from reference.pipeline_model import simulate

    g = _Grader("check_overlap_ceiling", overlap_ceiling, "overlap_ceiling", seed)
    shapes = [(64, 128), (128, 128), (256, 80)]
    shapes += [(int(g.rng.integers(16, 300)), int(g.rng.integers(16, 200))) for _ in range(cases - len(shapes))]
    for d, bn in shapes:
        g.start(headdim=d, block_n=bn)
        du = simulate("sequential", d, 1024, block_n=bn).durations_us
        gemms, soft = du["gemm0"] + du["gemm1"], du["softmax"]
        got = g.call(d, block_n=bn)
        g.type_is(got, float, "the ratio")
        g.close(got, (gemms + soft) / max(gemms, soft), "ratio")
    g.ok("the pipeline model's durations")


def check_step_gains(step_gains, *, seed: int = 808, cases: int = 30) -> None:
    """Notebook 08, exercise 2: each step's TFLOPs/s over the previous present step's.

    Expected: ``{"stepNN": t_NN / t_prev, …}`` in step order for the rows of the given dtype (peers
    and other dtypes mixed in, steps missing at random); ``ValueError`` with fewer than two steps.

    Raises:
        AssertionError: a wrong dict (keys, order, values) or a missing ValueError.
        NotImplementedError: still the stub.
    """
    g = _Grader("check_step_gains", step_gains, "step_gains", seed)
    for _ in range(cases):
        present = [f"step0{n}" for n in range(1, 6) if g.rng.random() < 0.7]
        rows = [{"impl": i, "dtype": "bf16", "tflops": float(g.rng.uniform(100, 900))} for i in present]
        rows += [{"impl": "fa3", "dtype": "bf16", "tflops": 700.0}, {"impl": "step01", "dtype": "fp16", "tflops": 1.0}]
        g.rng.shuffle(rows)
        g.start(rows=[(r["impl"], r["dtype"], round(r["tflops"], 3)) for r in rows], dtype="bf16")
        if len(present) < 2:
            g.raises(ValueError, rows, "bf16")
            continue
        t = {r["impl"]: r["tflops"] for r in rows if r["impl"].startswith("step") and r["dtype"] == "bf16"}
        want = {b: t[b] / t[a] for a, b in zip(present, present[1:])}
        got = g.call(rows, "bf16")
        if not isinstance(got, dict):
            raise g.fail(f"{g.fn_name} must return a dict", f"got {type(got).__name__}")
        g.equal(list(got), list(want), "keys (steps present after the first, in step order)")
        g.close(list(got.values()), list(want.values()), "ratios")
    g.ok("ratios of consecutive present steps")


# ------------------------------------------------------------------------------------ notebook 09

def check_preprocess_d(preprocess_d, *, seed: int = 909, cases: int = 20) -> None:
    """Notebook 09, exercise 1: D = rowsum(dO ∘ O) of BSHD arrays, as (batch, nheads, seqlen_q) (paper App. B.1,
    Algorithm 3 line 1; the preprocess kernel of step 11).

    Expected: ``reference.backward.preprocess``'s dpsum without its padding, float64, on awkward shapes
    (seqlen 1, odd head counts, headdim 64/128) and on rows of zeros.

    Raises:
        AssertionError: a wrong value, shape or dtype. NotImplementedError: still the stub.
    """
    from reference.backward import preprocess

    g = _Grader("check_preprocess_d", preprocess_d, "preprocess_d", seed)
    for _ in range(cases):
        b, s, h = (int(n) for n in g.rng.integers(1, [3, 300, 5]))
        d = int(g.rng.choice([64, 128]))
        out, dout = g.rng.standard_normal((2, b, s, h, d))
        if s > 2:
            dout[:, 1] = 0.0                                           # a row of zeros
        g.start(out=out, dout=dout)
        got = g.call(out.copy(), dout.copy())
        want = preprocess(out, dout, np.zeros((b, h, s)), s)[0]
        g.close(got, want, "D", rtol=1e-10, atol=1e-12)
    g.ok("reference.backward.preprocess")


def check_ds_tile(ds_tile, *, seed: int = 910, cases: int = 30) -> None:
    """Notebook 09, exercise 2: dS = P ∘ (dP − D) with P = exp(α·S − lse) recomputed from softmax_lse (paper
    App. B.1, Algorithm 3 lines 22–24; step 11's stages 3–4, untransposed).

    Expected: the same arithmetic as ``reference.backward`` on one tile: masked scores (−inf) give P = 0, a row
    that sees no key (lse = +inf) gives dS = 0, never NaN; lse taken from the scores themselves, so P's rows sum
    to at most 1.

    Raises:
        AssertionError: a wrong value or shape, or NaN. NotImplementedError: still the stub.
    """
    g = _Grader("check_ds_tile", ds_tile, "ds_tile", seed)
    for _ in range(cases):
        br, bc = (int(n) for n in g.rng.integers(1, [129, 129]))
        alpha = float(g.rng.uniform(0.05, 0.2))
        s = g.rng.standard_normal((br, bc)) * 4
        s[g.rng.random((br, bc)) < 0.2] = -np.inf                       # masked keys
        if br > 1:
            s[0] = -np.inf                                             # a row that sees no key
        with np.errstate(invalid="ignore", divide="ignore"):
            m = s.max(axis=1)
            lse = np.where(np.isfinite(m), alpha * m + np.log(np.exp(alpha * (s - m[:, None])).sum(axis=1)), np.inf)
        lse = lse + g.rng.uniform(0, 1, br)                             # as if other key tiles added to ℓ
        dp, d = g.rng.standard_normal((br, bc)), g.rng.standard_normal(br)
        g.start(s=s, dp=dp, lse=lse, d=d, softmax_scale=alpha)
        got = g.call(s.copy(), dp.copy(), lse.copy(), d.copy(), alpha)
        with np.errstate(invalid="ignore"):
            p = np.exp(alpha * s - lse[:, None])
        p = np.where(np.isnan(p), 0.0, p)
        g.close(got, p * (dp - d[:, None]), "dS", rtol=1e-10, atol=1e-14)
    g.ok("P ∘ (dP − D) with P = exp(α·S − lse)")


# ------------------------------------------------------------------------------ the CUDA exercise

def exercise_source_problems(path) -> list[str]:
    """Reasons a CUDA exercise source cannot pass, read from the text (empty list: none found).

    Looks for a call of the student copy's stub (a line ``exercise01_stub(o);``) and for calls that
    the exercise forbids inside the region (``softmax.update``, ``rescale_rows``).
    """
    import re

    text = Path(path).read_text()
    problems = []
    if re.search(r"^\s*\w+_stub\(", text, re.M):
        problems.append(f"{path} still calls the stub (exercise01_stub): write stage 3 of the main loop")
    body = text.split("// 3. online softmax")[-1].split("// 4.")[0]
    for call in ("softmax.update", "rescale_rows"):
        if call in body:
            problems.append(f"{path}: step 3 calls {call}; the exercise is to write it out (fa3/softmax.h is the answer)")
    return problems


def build_exercise(path=None, *, verbose: bool = False, unavailable=()):
    """Compile a CUDA exercise source (solution or student copy) into its own torch extension.

    The extension holds ``path`` plus ``cuda/exercises/exercise_binding.cpp`` and exposes
    ``fwd(q, k, v, causal, softmax_scale) -> [out, lse]`` (BSHD fp16/bf16 CUDA tensors, headdim 64,
    128 or 256; lse (batch, nheads, seqlen_q) float32). Built with the kernels' flags
    (``fa3_lab._build.NVCC_FLAGS``) into ``$FA3_LAB_CACHE/exercise-<hash of the sources>``.

    Args:
        path: the exercise ``.cu`` file; default ``cuda/exercises/ex01_online_softmax.cu``.
        unavailable: identifiers of ``fa3/softmax.h`` that the source may not use (the course kit's
            grading passes the answers: ``update``, ``rescale_rows`` …): the build sees a
            ``fa3/softmax.h`` that ends with ``#pragma GCC poison`` of them, so a call does not compile.

    Returns:
        the loaded extension module.

    Raises:
        FileNotFoundError: ``path`` does not exist. RuntimeError: no sm_90 GPU, or the compiler
        failed (torch's message carries the log).
    """
    import hashlib
    import os

    from .. import _build, _env

    path = Path(path) if path is not None else CUDA_EXERCISE
    if not path.is_file():
        raise FileNotFoundError(f"path: no CUDA exercise source at {path}")
    reason = _env.why_no_sm90()
    if reason:
        raise RuntimeError(f"building a CUDA exercise needs an sm_90 GPU (H100/H200): {reason}")
    import torch.utils.cpp_extension as cpp_ext

    h = hashlib.sha256(path.read_bytes())
    h.update(EXERCISE_BINDING.read_bytes())
    for header in sorted((CUDA_DIR / "include").rglob("*.h")):
        h.update(header.read_bytes())
    h.update(" ".join(unavailable).encode())
    digest = h.hexdigest()[:16]
    build_dir = _build.cache_dir() / f"exercise-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    includes = [str(CUDA_DIR / "include")]
    if unavailable:
        includes.insert(0, str(poisoned_include(build_dir / "poisoned", unavailable)))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    return cpp_ext.load(
        name=f"fa3_lab_exercise_{digest}",
        sources=[str(EXERCISE_BINDING), str(path)],
        extra_include_paths=includes,
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=list(_build.NVCC_FLAGS),
        build_directory=str(build_dir),
        verbose=verbose,
    )


def poisoned_include(folder, unavailable) -> Path:
    """Write ``folder/fa3/softmax.h``: the real header, then ``#pragma GCC poison`` of ``unavailable``.

    Put ``folder`` before ``cuda/include`` on the include path: ``#include "fa3/softmax.h"`` then finds
    this file, and any later use of a poisoned identifier is a compile error ("attempt to use poisoned").
    Returns ``folder``.
    """
    import re

    for name in unavailable:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"unavailable: {name!r} is not a C++ identifier")
    folder = Path(folder)
    (folder / "fa3").mkdir(parents=True, exist_ok=True)
    real = (CUDA_DIR / "include" / "fa3" / "softmax.h").resolve()
    (folder / "fa3" / "softmax.h").write_text(
        "// fa3/softmax.h as the course kit's grader sees it: the answers to the exercise are unavailable.\n"
        "#pragma once\n"
        f'#include "{real}"\n'
        f"#pragma GCC poison {' '.join(unavailable)}\n")
    return folder


#: (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, causal) of :func:`check_cuda_exercise`.
CUDA_EXERCISE_SHAPES = (
    (2, 128, 128, 4, 4, 128, False),
    (1, 113, 203, 4, 2, 64, True),
    (2, 1000, 1000, 2, 1, 128, True),
    (1, 203, 113, 2, 2, 256, False),
    (1, 1, 300, 4, 1, 64, False),
)


def check_cuda_exercise(module, *, seed: int = 1, dtype: str = "bf16", shapes=CUDA_EXERCISE_SHAPES,
                        device: str = "cuda") -> None:
    """Check a built CUDA exercise (``build_exercise(...)``) against ``fa3_lab.torch_ref.attention_ref``.

    FA3's tolerance rule (docs/design.md, Tests): max |out − ref| ≤ 2 · max |emulation − ref| + 1e-3 (ref in
    float32, emulation = standard attention in ``dtype``); lse to 1e-3 absolute where finite, +inf where
    a row sees no key. The output is poisoned with NaN before each call.

    ``device`` is where the inputs live ("cuda"; the tests pass "cpu" with a stand-in module).

    Raises:
        AssertionError: a mismatch (message: shape, first bad index, max/mean error, tolerance, seed;
            an all-NaN output says the stub is still in place).
    """
    import torch

    from ..torch_ref import attention_ref

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    for b, sq, sk, h, hkv, d, causal in shapes:
        what = f"batch={b} seqlen_q={sq} seqlen_k={sk} nheads={h} nheads_kv={hkv} headdim={d} causal={causal} {dtype}"
        q = torch.randn(b, sq, h, d, device=device, dtype=tdtype, generator=gen)
        k = torch.randn(b, sk, hkv, d, device=device, dtype=tdtype, generator=gen)
        v = torch.randn(b, sk, hkv, d, device=device, dtype=tdtype, generator=gen)
        scale = d ** -0.5
        ref, ref_lse = attention_ref(q, k, v, causal, scale)
        emu, _ = attention_ref(q, k, v, causal, scale, upcast=False)
        out = torch.full_like(q, float("nan"))
        out, lse = module.fwd(q, k, v, causal, scale, out)
        if device == "cuda":
            torch.cuda.synchronize()
        err = (out.float() - ref).abs()
        tol = 2 * (emu.float() - ref).abs().max().item() + 1e-3
        repro = f"reproduce: fa3_lab.lab.grading.check_cuda_exercise(fa3_lab.lab.grading.build_exercise(PATH), seed={seed})"
        if torch.isnan(out).all():
            raise AssertionError(f"check_cuda_exercise: the output is NaN everywhere ({what}): the exercise region "
                                 f"still holds the stub (exercise01_stub poisons O). Write step 3 of the main loop.\n"
                                 f"  {repro}")
        bad = ~(err <= tol)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            fin = err[torch.isfinite(err)]
            raise AssertionError(
                f"check_cuda_exercise: out differs from attention_ref ({what})\n"
                f"  {int(bad.sum())} of {err.numel()} entries beyond the tolerance {tol:.3g}; first at (b, s, h, d) = "
                f"{first}: got {out[first].item():.5g}, expected {ref[first].item():.5g}\n"
                f"  max |error| {fin.max().item() if fin.numel() else float('inf'):.3g}, mean |error| "
                f"{fin.mean().item() if fin.numel() else float('inf'):.3g}; NaN entries {int(torch.isnan(out).sum())}\n"
                f"  {repro}")
        inf_ref = torch.isinf(ref_lse)
        lse_bad = (inf_ref != torch.isinf(lse)) | (~inf_ref & ~((lse - ref_lse).abs() <= 1e-3))
        if lse_bad.any():
            first = tuple(int(i) for i in lse_bad.nonzero()[0])
            raise AssertionError(f"check_cuda_exercise: lse differs from attention_ref ({what}); first at "
                                 f"(b, h, s) = {first}: got {lse[first].item():.6g}, expected "
                                 f"{ref_lse[first].item():.6g}\n  {repro}")
    print(f"check_cuda_exercise: ok — {len(shapes)} shapes match attention_ref within FA3's tolerance (seed {seed})")
