"""fa3_lab.examples.train: the data, the schedule and the command line on CPU; the two runs on the GPU."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fa3_lab.examples import train  # noqa: E402


def test_synthetic_batches_are_seeded_shaped_and_learnable():
    a = list(train.synthetic_batches(3, 2, 300, 512, seed=1))
    b = list(train.synthetic_batches(3, 2, 300, 512, seed=1))
    c = list(train.synthetic_batches(1, 2, 300, 512, seed=2))
    assert [x.shape for x in a] == [(2, 301)] * 3 and a[0].dtype == torch.int64
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert int(a[0].min()) >= 0 and int(a[0].max()) < 512
    # the Markov chain: each token is followed by at most 4 distinct tokens in the first half
    first = a[0][:, :150]
    follow = {}
    for row in first.tolist():
        for x, y in zip(row, row[1:]):
            follow.setdefault(x, set()).add(y)
    assert max(len(s) for s in follow.values()) <= 4


@pytest.mark.parametrize("kwargs,match", [(dict(steps=0), "steps"), (dict(batch=True), "batch"),
                                          (dict(vocab=4), "vocab")])
def test_synthetic_batches_bad_sizes(kwargs, match):
    args = dict(steps=1, batch=1, seqlen=8, vocab=64) | kwargs
    with pytest.raises(ValueError, match=match):
        next(train.synthetic_batches(**args))


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [train.lr_at(s, 300) for s in range(300)]
    assert lrs[0] == pytest.approx(train.LR / train.WARMUP_STEPS)
    assert max(lrs) == pytest.approx(train.LR)
    assert lrs[-1] == pytest.approx(0.1 * train.LR, rel=1e-3)
    assert all(x >= y for x, y in zip(lrs[train.WARMUP_STEPS:], lrs[train.WARMUP_STEPS + 1:]))


def test_final_loss_is_the_mean_of_the_last_ten():
    assert train.final_loss(list(range(20))) == pytest.approx(14.5)
    assert train.final_loss([3.0]) == 3.0


def test_model_is_about_a_hundred_million_parameters():
    pytest.importorskip("transformers")
    n = sum(p.numel() for p in train.build_model("sdpa", device="meta").parameters())
    assert 90e6 < n < 130e6, n


def test_cli_on_cpu_says_it_needs_a_gpu(capsys):
    from fa3_lab import _env

    if not _env.why_no_sm90():
        pytest.skip("an sm_90 GPU is present")
    assert train.main(["--steps", "1"]) == 2
    assert "needs an sm_90 GPU" in capsys.readouterr().out


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        train.main(["--steps", "0"])


@pytest.mark.gpu
@pytest.mark.slow
def test_short_training_runs_agree(tmp_path):
    """Both runs on the GPU (a short, 2-layer version): losses agree and both files are written."""
    pytest.importorskip("transformers")
    rc = train.main(["--steps", "40", "--layers", "2", "--batch", "4", "--seqlen", "1024", "--out", str(tmp_path)])
    assert (tmp_path / "train.json").is_file() and (tmp_path / "train.png").is_file()
    assert rc == 0


def test_run_summary_takes_the_median_steady_step_and_the_model_alone_peak():
    """Run.summary on CPU: tokens/s from the median step after WARMUP_STEPS, peak memory = parameters + optimizer
    state + the largest rise of one steady step (the other model's state, below every step's start, not counted)."""
    model = torch.nn.Linear(4, 3)  # 15 float32 parameters: 60 bytes
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # exp_avg, exp_avg_sq (60 bytes each) and a step counter per parameter tensor
    run = object.__new__(train.Run)
    run.model, run.opt, run.losses = model, opt, [1.0] * 25
    run.times = [9.0] * train.WARMUP_STEPS + [0.5, 0.1, 0.2, 0.3, 0.4]   # seconds; the warm-up ones ignored
    run.rises = [10**9] * train.WARMUP_STEPS + [100, 300, 200, 100, 100]  # bytes; the first step's is not steady
    counters = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k == "step")
    assert run.persistent_bytes() == 60 * 3 + counters
    out = run.summary(batch=2, seqlen=10)
    assert out["step_ms"] == pytest.approx(300.0) and out["tokens_per_s"] == pytest.approx(20 / 0.3)
    assert out["peak_memory_gb"] == pytest.approx((60 * 3 + counters + 300) / 2**30)
    assert out["losses"] == run.losses and len(out["step_times_ms"]) == 25
