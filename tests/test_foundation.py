"""Foundation: packaging agrees with itself, the CLI fails loudly, results follow one schema.

Covers fa3_lab/info.py, fa3_lab/tour.py, fa3_lab/results.py, fa3_lab/readme.py, environment.yml
and pyproject.toml.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from fa3_lab import _env, registry
from fa3_lab.lab import cli, info, readme, results, tour
from reference._validate import causal_visible

ROOT = _env.REPO_ROOT


def _python_m(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------------- packaging

def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _environment_pip_list(text: str) -> list[str]:
    """The entries under `- pip:` of environment.yml (a tiny parser for this one file's shape)."""
    entries, pip_indent = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if stripped == "- pip:":
            pip_indent = indent
            continue
        if pip_indent is not None:
            if indent <= pip_indent:
                pip_indent = None
                continue
            assert stripped.startswith("- "), f"environment.yml: unexpected line under pip: {line!r}"
            entries.append(stripped[2:].split("#")[0].strip())
    return entries


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    listed = [e for e in _environment_pip_list((ROOT / "environment.yml").read_text()) if e != "-e ."]
    assert listed, "environment.yml: found no pip dependencies"
    assert sorted(listed) == sorted(wanted), (
        f"environment.yml and pyproject.toml disagree: only in environment.yml "
        f"{sorted(set(listed) - set(wanted))}, only in pyproject.toml {sorted(set(wanted) - set(listed))}")
    assert "-e ." in _environment_pip_list((ROOT / "environment.yml").read_text())
    # the conda python satisfies requires-python
    pyver = re.search(r"^\s*-\s*python=(\d+)\.(\d+)", (ROOT / "environment.yml").read_text(), re.M)
    low = re.match(r">=(\d+)\.(\d+)", project["requires-python"])
    assert pyver and low and tuple(map(int, pyver.groups())) >= tuple(map(int, low.groups()))


def test_environment_parser_sees_a_difference():
    text = "dependencies:\n  - pip\n  - pip:\n      - numpy>=1.26\n      # c\n      - rich>=13\n  - other\n"
    assert _environment_pip_list(text) == ["numpy>=1.26", "rich>=13"]
    assert _requirement_name("ml_dtypes>=0.4") == "ml-dtypes"


def test_ci_runs_the_readme_quickstart_as_written():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md: no ```bash block under ## Quickstart"
    commands = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(commands) == 2, f"README quickstart: expected exactly two commands, got {commands}"
    assert "--nbval" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [ln.strip() for ln in ci.splitlines() if not ln.strip().startswith("#")]
    for command in commands:
        assert any(ln.startswith(command) for ln in ci_lines), f".ci/run does not run {command!r}"


# ------------------------------------------------------------------------------------------ CLI

def _subcommands():
    return [name for name, _ in cli._available()]


def test_top_level_help_lists_every_subcommand():
    r = _python_m("fa3_lab", "--help")
    assert r.returncode == 0, r.stderr
    names = _subcommands()
    assert {"info", "tour"} <= set(names)
    for name in names:
        assert name in r.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_subcommand_help_exits_0(name):
    r = _python_m("fa3_lab", name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m fa3_lab " + name)


def _one_line_reason(stderr: str) -> str:
    """argparse prints a usage line then one 'error:' line; our UsageError prints only the latter."""
    errors = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert len(errors) == 1, f"expected one error line, got {stderr!r}"
    return errors[0]


@pytest.mark.parametrize("argv, needle", [
    (["nonsense"], "invalid choice"),
    (["info", "--bogus"], "--bogus"),
    (["tour", "--seqlen", "abc"], "--seqlen"),
    (["tour", "--seqlen", "0"], "--seqlen"),
    (["tour", "--seqlen", str(tour.MAX_SEQLEN + 1)], "--seqlen"),
    (["tour", "--seqlen", "1.5"], "--seqlen"),
])
def test_bad_input_exits_2_with_one_line_reason(argv, needle):
    r = _python_m("fa3_lab", *argv)
    assert r.returncode == 2
    assert needle in _one_line_reason(r.stderr)
    assert "Traceback" not in r.stderr


def test_tour_seqlen_errors_are_exactly_one_line():
    r = _python_m("fa3_lab", "tour", "--seqlen", "-3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("python -m fa3_lab tour: error: --seqlen: expected an integer 1..")
    assert r.stdout == ""  # nothing computed


def test_parse_seqlen():
    assert tour.parse_seqlen("113") == 113
    assert tour.parse_seqlen(str(tour.MAX_SEQLEN)) == tour.MAX_SEQLEN
    for bad in ("", "x", "0", "-1", "2.0", str(tour.MAX_SEQLEN + 1)):
        with pytest.raises(cli.UsageError, match="--seqlen"):
            tour.parse_seqlen(bad)


# ----------------------------------------------------------------------------------------- info

def test_info_json_is_truthful():
    r = _python_m("fa3_lab", "info", "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    expected_keys = {"python", "platform", "numpy", "torch", "torch_cuda_build", "cuda_runtime",
                     "cuda_driver", "nvidia_driver", "cudnn", "gpu", "compute_capability", "sm_count", "nvcc",
                     "nvcc_version", "cuobjdump", "nvdisasm", "can_run"}
    assert set(facts) == expected_keys
    assert facts["python"] == platform.python_version()
    assert facts["numpy"] == np.__version__
    assert facts["nvcc"] == _env.nvcc() and facts["nvdisasm"] == _env.nvdisasm()
    assert set(facts["can_run"]) == {"references", "sass", "kernels"}
    for tier in facts["can_run"].values():
        assert isinstance(tier["ok"], bool)
        assert (tier["why"] == "") == tier["ok"], tier  # a reason exactly when it cannot run
    assert facts["can_run"]["references"]["ok"] is True
    nvcc_ok = _env.nvcc_version() is not None and info._version_tuple(_env.nvcc_version()) >= info.MIN_NVCC
    assert facts["can_run"]["kernels"]["ok"] == (_env.sm90_gpu() is not None and nvcc_ok)
    assert facts["can_run"]["sass"]["ok"] == (nvcc_ok and _env.nvdisasm() is not None)
    if _env.sm90_gpu() is None:
        assert _env.why_no_sm90() in facts["can_run"]["kernels"]["why"]
    else:
        assert facts["gpu"] == _env.sm90_gpu() and facts["sm_count"] >= 1


def test_info_reasons_for_old_or_missing_nvcc():
    assert "not found" in info._nvcc_reason(None, None)
    assert "older than 12.3" in info._nvcc_reason("/x/nvcc", "12.1")
    assert info._nvcc_reason("/x/nvcc", "12.3") == ""
    assert info._nvcc_reason("/x/nvcc", "13.0") == ""
    assert info._version_tuple("12.10") > info._version_tuple("12.3")


def test_info_on_a_simulated_h100(monkeypatch):
    h100 = {"torch": "2.11.0+cu130", "torch_cuda_build": "13.0", "cuda_runtime": "13.0", "cuda_driver": "13.0",
            "cudnn": 91900, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132}
    monkeypatch.setattr(info, "_torch_facts", lambda: dict(h100))
    monkeypatch.setattr(info, "_nvidia_smi_driver", lambda: "580.65.06")
    monkeypatch.setattr(_env, "why_no_sm90", lambda: "")
    monkeypatch.setattr(_env, "nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(_env, "nvdisasm", lambda: None)
    monkeypatch.setattr(_env, "nvcc_version", lambda: "12.2")
    facts = info.collect()
    assert facts["gpu"] == "NVIDIA H100 80GB HBM3" and facts["nvidia_driver"] == "580.65.06"
    assert facts["can_run"]["kernels"] == {"ok": False, "why": info._nvcc_reason("/usr/local/cuda/bin/nvcc", "12.2")}
    assert not facts["can_run"]["sass"]["ok"] and "nvdisasm not found" in facts["can_run"]["sass"]["why"]
    monkeypatch.setattr(_env, "nvcc_version", lambda: "12.8")
    assert info.collect()["can_run"]["kernels"] == {"ok": True, "why": ""}


def test_info_tables_render():
    r = _python_m("fa3_lab", "info")
    assert r.returncode == 0, r.stderr
    assert "What can run here" in r.stdout and "NumPy" in r.stdout


# -------------------------------------------------------------------------------------- FLOPs

def test_flops_hand_counts():
    b, h, d = 2, 3, 64
    assert results.flops(b, h, 4, 4, d, False) == 4 * b * h * 4 * 4 * d
    assert results.flops(b, h, 4, 4, d, True) == 4 * b * h * d * (1 + 2 + 3 + 4)
    # seqlen_q < seqlen_k, bottom-right: row 0 sees keys 0..3, row 1 sees 0..4
    assert results.flops(1, 1, 2, 5, 1, True) == 4 * (4 + 5)
    # seqlen_q > seqlen_k: rows 0-2 see nothing, row 3 sees key 0, row 4 sees keys 0..1
    assert results.flops(1, 1, 5, 2, 1, True) == 4 * (0 + 0 + 0 + 1 + 2)
    # seqlen 1: one pair
    assert results.flops(1, 1, 1, 1, 128, True) == 4 * 128
    # docs/design.md's ablation config, non-causal: 4·b·h·s²·d
    assert results.flops(4, 16, 8448, 8448, 128, False) == 4 * 4 * 16 * 8448 ** 2 * 128


def test_flops_causal_matches_the_mask(rng):
    for _ in range(20):
        sq, sk = (int(x) for x in rng.integers(1, 300, size=2))
        assert results.visible_pairs(sq, sk, True) == int(causal_visible(sq, sk).sum()), (sq, sk)
    # the average key length at sq = sk = N is (N + 1) / 2, a little over half
    assert results.flops(1, 1, 1024, 1024, 1, True) / results.flops(1, 1, 1024, 1024, 1, False) == \
        pytest.approx(1025 / 2048)


def test_flops_rejects_bad_input():
    with pytest.raises(TypeError, match="seqlen_q"):
        results.flops(1, 1, 2.0, 4, 64, False)
    with pytest.raises(ValueError, match="headdim"):
        results.flops(1, 1, 4, 4, 0, False)
    with pytest.raises(TypeError, match="causal"):
        results.flops(1, 1, 4, 4, 64, "yes")
    with pytest.raises(TypeError, match="batch"):
        results.flops(True, 1, 4, 4, 64, False)
    assert results.flops(np.int64(2), 1, 4, 4, 64, False) == 2 * 4 * 16 * 64


# ------------------------------------------------------------------------------------ schema

def _meta(**over):
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132, "torch": "2.11.0+cu130", "cuda": "13.0",
            "cudnn": 91900, "commit": "abc1234", "date": "2026-11-22T10:00:00Z",
            "command": "python -m fa3_lab bench"}
    meta.update(over)
    return meta


def _row(impl="step04", ms=0.81, **over):
    row = {"impl": impl, "dtype": "bf16", "headdim": 128, "causal": False, "batch": 4, "seqlen_q": 4096,
           "seqlen_k": 4096, "nheads": 16, "nheads_kv": 16, "ms": ms}
    row.update({k: v for k, v in over.items() if k != "tflops"})
    row["tflops"] = over.get("tflops", round(results.tflops(row), 1))
    return row


def test_validate_accepts_a_good_doc():
    doc = {"meta": _meta(), "rows": [_row(), _row("fa3", 0.85), _row("cudnn", 0.9, causal=True),
                                     _row("step05", 0.5, dtype="e4m3", nheads_kv=4)]}
    assert results.validate(doc) is doc
    # the example row of docs/design.md: 4·4·16·4096²·128 = 549755813888 FLOPs in 0.81 ms = 678.7 TFLOPs/s;
    # the 678.2 written there is within the 1% rounding tolerance, a typed 700 is not
    assert _row()["tflops"] == 678.7
    results.validate({"meta": _meta(), "rows": [_row(tflops=678.2)]})
    with pytest.raises(results.SchemaError, match="tflops"):
        results.validate({"meta": _meta(), "rows": [_row(tflops=700.0)]})


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["meta"].pop("commit"), "meta: missing key(s) commit"),
    (lambda d: d["meta"].update(sm_count="132"), "meta.sm_count"),
    (lambda d: d["meta"].update(date="22/11/2026"), "meta.date"),
    (lambda d: d["meta"].update(cudnn="9.19"), "meta.cudnn"),
    (lambda d: d.pop("rows"), "missing key 'rows'"),
    (lambda d: d.update(rows=[]), "rows: expected a non-empty list"),
    (lambda d: d["rows"][0].pop("ms"), "rows[0]: missing key(s) ms"),
    (lambda d: d["rows"][1].update(impl="flash2"), "rows[1].impl: expected one of"),
    (lambda d: d["rows"][0].update(dtype="fp32"), "rows[0].dtype"),
    (lambda d: d["rows"][0].update(causal=1), "rows[0].causal"),
    (lambda d: d["rows"][0].update(seqlen_k=0), "rows[0].seqlen_k"),
    (lambda d: d["rows"][0].update(nheads_kv=5), "rows[0].nheads_kv"),
    (lambda d: d["rows"][0].update(ms=float("nan")), "rows[0].ms"),
    (lambda d: d["rows"][0].update(tflops=999.0), "rows[0].tflops: 999.0 does not match"),
])
def test_validate_rejects_bad_docs_naming_the_key(mutate, message):
    doc = {"meta": _meta(), "rows": [_row(), _row("fa3", 0.85)]}
    results.validate(doc)
    mutate(doc)
    with pytest.raises(results.SchemaError) as e:
        results.validate(doc)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_save_load_roundtrip(tmp_path):
    rows = [_row(), _row("sdpa_flash", 1.6)]
    path = results.save("bench_bf16", rows, _meta(), root=tmp_path)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3" / "bench_bf16.json"
    older = results.save("older", [_row("step01", 2.0)], _meta(date="2026-11-01T00:00:00Z"), root=tmp_path)
    runs = results.load_all(tmp_path)
    assert [r.path for r in runs] == [older, path]  # oldest first
    assert runs[1].rows == rows and runs[1].meta == _meta()
    assert runs[1].describe() == "recorded on NVIDIA H100 80GB HBM3 (132 SMs), 2026-11-22, commit abc1234"


def test_save_writes_nothing_on_bad_input(tmp_path):
    with pytest.raises(ValueError, match="name"):
        results.save("../escape", [_row()], _meta(), root=tmp_path)
    with pytest.raises(results.SchemaError, match="impl"):
        results.save("x", [_row(impl="mine")], _meta(), root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert results.load_all(tmp_path / "missing") == []


def test_load_all_names_a_broken_file(tmp_path):
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "bad.json").write_text('{"meta": {}, "rows": []}')
    with pytest.raises(results.SchemaError, match=r"bad\.json: meta: missing key"):
        results.load_all(tmp_path)
    (tmp_path / "gpu" / "bad.json").write_text("{not json")
    with pytest.raises(results.SchemaError, match="not valid JSON"):
        results.load_all(tmp_path)


def test_load_all_skips_only_the_other_record_folders(tmp_path):
    results.save("bench", [_row()], _meta(), root=tmp_path)
    for other in results.OTHER_RECORD_DIRS:  # records of another kind (sass counts, CPU numbers)
        (tmp_path / other).mkdir()
        (tmp_path / other / "x.json").write_text('{"meta": {"date": "2026-11-22"}, "steps": {}}')
    assert [r.path.parent.name for r in results.load_all(tmp_path)] == ["nvidia-h100-80gb-hbm3"]
    (tmp_path / "nvidia-h200").mkdir()
    (tmp_path / "nvidia-h200" / "x.json").write_text('{"meta": {"date": "2026-11-22"}, "steps": {}}')
    with pytest.raises(results.SchemaError, match=r"nvidia-h200/x\.json"):
        results.load_all(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        results.save("x", [_row()], _meta(gpu="CPU"), root=tmp_path)


def test_recorded_results_in_the_repo_are_valid():
    for run in results.load_all():  # raises on any invalid file
        assert run.path.parent.name == results.gpu_slug(run.meta["gpu"])


def test_collect_meta(monkeypatch):
    if _env.why_no_sm90() and not _torch_cuda():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            results.collect_meta("python -m fa3_lab bench")
    monkeypatch.setattr(results, "_gpu_facts", lambda: {"gpu": "NVIDIA H200", "sm_count": 132,
                                                        "torch": "2.13.0", "cuda": "13.0", "cudnn": 91900})
    meta = results.collect_meta("python -m fa3_lab bench --quick")
    assert list(meta) == list(results.META_KEYS)
    assert meta["commit"] == _env.git_commit() and meta["command"] == "python -m fa3_lab bench --quick"
    results.validate({"meta": meta, "rows": [_row()]})
    with pytest.raises(TypeError, match="command"):
        results.collect_meta("")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------ README

def test_readme_results_table_is_current():
    r = _python_m("fa3_lab.lab.readme", "--check")
    assert r.returncode == 0, r.stdout + r.stderr


def _code_changed_since(root, commit, paths):
    """The changed code lines of ``paths`` between ``commit`` and this checkout (whole-line comments, the generated
    step headers among them, and blank lines aside)."""
    diff = subprocess.run(["git", "diff", "--unified=0", commit, "--", *paths], cwd=root, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    return [ln for ln in diff if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
            and ln[1:].strip() and not ln[1:].lstrip().startswith("//")]


def test_the_current_runs_kernels_are_the_checkouts():
    """The README says the kernels the current run timed have not changed since it was recorded: the step files of
    every step in the run and cuda/include/ have the same code (comments aside: the step headers are generated) at
    each current run's commit and in this checkout (a change there needs a new recorded run; a new step does not)."""
    import shutil

    root = readme._env.REPO_ROOT
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    commits = {r.meta["commit"] for runs in results.current_runs().values() for r in runs}
    timed = {results.base_step(r["impl"]) for runs in results.current_runs().values() for run in runs
             for r in run.rows if r["impl"].startswith("step")}
    paths = ["cuda/include/"] + sorted(registry.step(int(marker[4:])).path for marker in timed)
    assert len(paths) > 1
    for commit in sorted(commits):
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True)
        if known.returncode != 0:
            pytest.skip(f"commit {commit} is not in this clone's history (shallow clone)")
        changed = _code_changed_since(root, commit, paths)
        assert not changed, (f"timed kernels changed since the current run's commit {commit}: {changed[:5]}; record a "
                             f"new run (README 'Results') or move the run to tools/experiments/results/")
    assert "the kernels it\ntimed have not changed since" in (root / "README.md").read_text()


def test_notebook_08s_six_shape_ablation_has_the_checkouts_forward_kernels():
    """Notebook 08 shows every forward step at six shapes from the current run's commit, or, where the current run did
    not time them, from the newest archived ablation_steps.json: its forward step files must then have the same code
    (comments aside) at that commit and in this checkout, so the table shows the kernels the lab ships."""
    import shutil

    root = readme._env.REPO_ROOT
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for slug, runs in results.current_runs().items():
        ablation = [r for r in runs if r.path.name == "ablation.json"]
        if not ablation:
            continue
        folder = results.ARCHIVE_DIR / slug
        if (folder / ablation[0].meta["commit"] / "ablation_steps.json").exists():
            continue
        wide = max((results.load(p) for p in folder.glob("*/ablation_steps.json")), key=lambda r: r.meta["date"])
        commit = wide.meta["commit"]
        if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=root, capture_output=True).returncode:
            pytest.skip(f"commit {commit} is not in this clone's history (shallow clone)")
        paths = ["cuda/include/"] + [s.path for s in registry.series("fwd")]
        changed = _code_changed_since(root, commit, paths)
        assert not changed, (f"{wide.path}: forward kernels changed since {commit}: {changed[:5]}; time the six "
                             f"shapes again (tools/experiments/grid_vs_base.py --no-grid --ablation)")


def _readme(tmp_path, body="intro\n"):
    p = tmp_path / "README.md"
    p.write_text(f"# x\n{body}{readme.BEGIN}\nold table\n{readme.END}\nafter\n")
    return p


def test_readme_check_detects_a_stale_table(tmp_path):
    res = tmp_path / "results"
    results.save("bench", [_row("step03", 1.0), _row("step04", 0.81), _row("fa3", 0.85),
                           _row("cudnn", 0.9), _row("step04", 0.79, causal=True)], _meta(), root=res)
    path = _readme(tmp_path)
    args = ["--readme", str(path), "--results", str(res)]
    assert readme.main(["--check", *args]) == 1
    assert "old table" in path.read_text()  # --check changes nothing
    assert readme.main(args) == 0
    text = path.read_text()
    assert text.startswith("# x\nintro\n") and text.endswith(f"{readme.END}\nafter\n")
    assert "Current run on **NVIDIA H100 80GB HBM3** (132 SMs), commit `abc1234`, 2026-11-22" in text
    assert readme.main(["--check", *args]) == 0
    # best step (step04, 0.81 ms) over fa3 (0.85 ms) and cudnn (0.9 ms), from the same rows
    ratio_fa3 = f"{_row('step04', 0.81)['tflops'] / _row('fa3', 0.85)['tflops']:.2f}×"
    ratio_cudnn = f"{_row('step04', 0.81)['tflops'] / _row('cudnn', 0.9)['tflops']:.2f}×"
    line = next(ln for ln in text.splitlines() if ln.startswith("| bf16 | 128 | full | 4096 |"))
    assert ratio_fa3 in line and ratio_cudnn in line and "step04" in line
    causal = next(ln for ln in text.splitlines() if ln.startswith("| bf16 | 128 | causal |"))
    assert causal.count("—") >= 2  # no peer measured on that shape
    assert "**—** = no measurement in this run" in text  # and the dash is explained
    # the full table (docs/results.md) from the same rows
    header, rows = readme.pivot(results.load_all(res)[0])
    full = next(r for r in rows if r[:4] == ["bf16", "128", "full", "4096"])
    assert full[header.index("best step")].startswith("step04 (")
    assert full[header.index("best/fa3")] == ratio_fa3 and full[header.index("best/cudnn")] == ratio_cudnn


def test_readme_links_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "README.md links to no file of the repository"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_without_results_says_so(tmp_path):
    path = _readme(tmp_path)
    assert readme.main(["--readme", str(path), "--results", str(tmp_path / "none")]) == 0
    assert readme.NO_RESULTS in path.read_text()


def test_readme_without_markers_is_an_error(tmp_path, capsys):
    path = tmp_path / "README.md"
    path.write_text("# no markers\n")
    assert readme.main(["--check", "--readme", str(path), "--results", str(tmp_path)]) == 2
    assert "expected one <!-- results:begin -->" in capsys.readouterr().err


def test_compact_view_keeps_the_longest_seqlen_of_each_config():
    rows = [_row("step02", 1.0), _row("step04", 0.9), _row("cudnn", 1.2), _row("sdpa_math", 9.0),
            _row("step04", 3.0, seqlen_q=8192, seqlen_k=8192), _row("fa3", 2.5, seqlen_q=8192, seqlen_k=8192),
            _row("step02", 0.5, causal=True)]
    run = results.Run(path=ROOT / "x.json", meta=_meta(), rows=rows)
    header, table = readme.compact(run)
    assert header == ["dtype", "hdim", "mask", "seqlen", "ours", "fa3", "cudnn"]  # main peers present
    assert [r[:4] for r in table] == [["bf16", "128", "full", "8192"], ["bf16", "128", "causal", "4096"]]
    ours = _row("step04", 3.0, seqlen_q=8192, seqlen_k=8192)["tflops"]
    fa3 = _row("fa3", 2.5, seqlen_q=8192, seqlen_k=8192)["tflops"]
    assert table[0][4:] == [f"{ours:.0f} step04", f"{fa3:.0f} {ours / fa3:.2f}×", "—"]
    assert table[1][4:] == [f"{_row('step02', 0.5, causal=True)['tflops']:.0f} step02", "—", "—"]


# ------------------------------------------------------------------------------- README: the backward

def _bwd(impls_ms, seqlens=(2048, 8192), headdims=(64, 128), causals=(False, True), passes=("bwd", "fwd_bwd")):
    """Backward rows (bf16) of the paper grid's shapes: batch 16k/seqlen, nheads 2048/headdim."""
    return [_row(impl, ms, headdim=d, causal=c, seqlen_q=s, seqlen_k=s, batch=16384 // s, nheads=2048 // d,
                 nheads_kv=2048 // d, **{"pass": p})
            for d in headdims for c in causals for s in seqlens for p in passes for impl, ms in impls_ms]


#: step13's deterministic mode is the fastest row everywhere: it must never count as "our fastest step".
_BWD_GRID = (("step13", 1.0), ("step13_det", 0.9), ("cudnn", 1.25), ("sdpa_flash", 2.0))
_BWD_ABL = (("step11", 2.0), ("step12", 1.6), ("step13", 1.25), ("step13_det", 1.4), ("step14", 1.2),
            ("cudnn", 1.3), ("sdpa_flash", 1.8))


def _save_backward(res):
    results.save("bench_backward", _bwd(_BWD_GRID), _meta(command="python -m fa3_lab bench --backward"), root=res)
    results.save("ablation_backward", _bwd(_BWD_ABL, seqlens=(8192,), headdims=(128,)),
                 _meta(command="python -m fa3_lab bench --backward --steps 11,12,13,14 --deterministic "
                               "--name ablation_backward"), root=res)
    return results.current_runs(res)


def test_schema_knows_the_deterministic_backward_modes():
    assert "step13_det" in results.IMPLS and "step13_det" not in results.STEP_IMPLS
    assert "step04_det" not in results.IMPLS  # a forward step has no accumulation order
    assert results.IMPLS.index("step13_det") == results.IMPLS.index("step13") + 1
    assert results.base_step("step13_det") == results.base_step("step13") == "step13"
    assert results.base_step("cudnn") is None
    with pytest.raises(ValueError, match="impl"):
        results.base_step("step99_det")


def test_readme_shows_the_backward_figure_table_and_ablation(tmp_path):
    runs = _save_backward(tmp_path / "results")
    grid, abl = sorted(runs["nvidia-h100-80gb-hbm3"], key=lambda r: r.path.name)[::-1]
    assert (readme._kind(grid), readme._kind(abl)) == ("backward", "backward_ablation")
    assert readme.backward_runs([grid, abl]) == [grid] and not readme.grid_runs([grid, abl])
    assert readme.figure_path(grid).name == "fig6_nvidia-h100-80gb-hbm3_abc1234.png"
    block = readme.render(runs)
    assert ("Figure 6 of the paper, redone — [backward TFLOPs/s of our step against cuDNN and FlashAttention-2, bf16, "
            "NVIDIA H100 80GB HBM3, commit abc1234](docs/img/fig6_nvidia-h100-80gb-hbm3_abc1234.png)") in block
    assert "![Figure 6" not in block  # a link: the README shows one picture (the forward's)
    assert "| dtype | hdim | mask | seqlen | ours | cudnn | sdpa_flash |" in block
    t = {i: _row(i, ms, headdim=128, seqlen_q=8192, seqlen_k=8192, batch=2, nheads=16, **{"pass": "bwd"})["tflops"]
         for i, ms in _BWD_GRID}
    assert (f"| bf16 | 128 | full | 8192 | {t['step13']:.0f} step13 | {t['cudnn']:.0f} {t['step13'] / t['cudnn']:.2f}× "
            f"| {t['sdpa_flash']:.0f} {t['step13'] / t['sdpa_flash']:.2f}× |") in block
    assert "Fastest of our steps, backward, bf16 grid (8 points): step13 at 8." in block
    assert "Our fastest step ÷ cuDNN, backward, bf16, 8 points: median 1.25×" in block
    a = {i: _row(i, ms, headdim=128, seqlen_q=8192, seqlen_k=8192, batch=2, nheads=16, **{"pass": "bwd"})["tflops"]
         for i, ms in _BWD_ABL}
    pct = (1 - a["step13_det"] / a["step13"]) * 100
    sentence = (f"Backward ablation (bf16, batch 2, seqlen 8192, 16 heads, headdim 128, no mask, bwd pass): "
                f"step11 {a['step11']:.0f} → step12 {a['step12']:.0f} → step13 {a['step13']:.0f} → step14 "
                f"{a['step14']:.0f} TFLOPs/s; deterministic step13: {a['step13_det']:.0f} (−{pct:.1f} %); "
                f"cuDNN {a['cudnn']:.0f}, FA2 {a['sdpa_flash']:.0f}.")
    assert readme.backward_ablation_sentences(abl)[0] == sentence and sentence not in block  # the README: a table
    assert len(readme.backward_ablation_sentences(abl)) == 2  # one per shape: no mask, causal
    header, rows = readme.backward_ablation_table(abl)
    assert header == ["step", "128 8k", "128 8k causal"]
    assert [r[0] for r in rows] == ["step11", "step12", "step13", "step14", "step13 deterministic", "cuDNN", "FA2"]
    a_causal = _row("step13", dict(_BWD_ABL)["step13"], headdim=128, causal=True, seqlen_q=8192, seqlen_k=8192,
                    batch=2, nheads=16, **{"pass": "bwd"})["tflops"]
    assert rows[2] == ["step13", f"{a['step13']:.0f}", f"{a_causal:.0f}"]
    assert readme._markdown(header, rows) in block and "Backward ablation, the paper's Table 2 for the backward" in block
    assert readme.backward_ablation_table(abl, "fp16") == ([], [])
    with pytest.raises(ValueError, match="pass_"):
        readme.backward_ablation_table(abl, "bf16", "backward")
    by_hd = (f"Backward alone, seqlen ≥ 2k, bf16, causal and not, our fastest step ÷ cuDNN: headdim 64 "
             f"{t['step13'] / t['cudnn']:.2f}–{t['step13'] / t['cudnn']:.2f}× (4 of 4 points ≥ 1.00×), headdim 128 ")
    assert by_hd in block and readme.backward_by_headdim_sentences(grid, min_seqlen=16384) == []
    assert "step13_det at" not in block and "step13_det" not in block.split("| dtype | hdim")[1].split("\n\n")[0]
    full = readme.render_results_md(runs)
    assert "![Figure 6 (backward), NVIDIA H100 80GB HBM3](img/fig6_nvidia-h100-80gb-hbm3_abc1234.png)" in full
    assert f"- {sentence}" in full and "fwd_bwd pass): step11" in full
    assert full.count("### `") == 2 and "step13_det" in full.split("### `bench_backward.json`")[1]
    header, rows = readme.pivot(grid)
    assert all(r[header.index("best step")].startswith("step13 (") for r in rows)


def test_readme_writes_the_backward_figure_and_check_detects_drift(tmp_path, monkeypatch):
    res, img = tmp_path / "results", tmp_path / "img"
    _save_backward(res)
    path = _readme(tmp_path, body=f"{readme.STEPS_BEGIN}\n{readme.STEPS_END}\n")
    monkeypatch.setattr(readme, "README", path)  # the "repository" README: docs, figures and headers follow it
    monkeypatch.setattr(readme, "RESULTS_MD", tmp_path / "results.md")
    monkeypatch.setattr(readme, "IMG_DIR", img)
    monkeypatch.setattr(readme.headers, "update", lambda check=False: [])
    args = ["--results", str(res)]
    assert readme.main(["--check", *args]) == 1
    assert readme.main(args) == 0
    fig = img / "fig6_nvidia-h100-80gb-hbm3_abc1234.png"
    assert fig.read_bytes().startswith(b"\x89PNG") and fig.name in path.read_text()
    assert readme.main(["--check", *args]) == 0
    fig.unlink()  # a missing figure is stale
    assert readme.main(["--check", *args]) == 1
    assert readme.main(args) == 0 and fig.is_file()
    (img / "fig6_nvidia-h100-80gb-hbm3_0000000.png").write_bytes(b"old")  # a figure of no current run
    assert readme.main(["--check", *args]) == 1
    assert readme.main(args) == 0 and not (img / "fig6_nvidia-h100-80gb-hbm3_0000000.png").exists()
    rows = _bwd(_BWD_ABL, seqlens=(8192,), headdims=(128,))
    rows[0] = _row("step11", 1.5, **{k: rows[0][k] for k in ("headdim", "causal", "seqlen_q", "seqlen_k", "batch",
                                                             "nheads", "nheads_kv", "pass")})
    results.save("ablation_backward", rows, _meta(command="python -m fa3_lab bench --backward"), root=res)
    assert readme.main(["--check", *args]) == 1  # a new backward number: the README and results.md drift


def test_pivot_takes_the_median_of_repeats():
    run = results.Run(path=ROOT / "x.json", meta=_meta(),
                      rows=[_row("fa3", 1.0), _row("fa3", 2.0), _row("fa3", 4.0)])
    header, rows = readme.pivot(run)
    assert header[-1] == "fa3" and "best step" not in header
    assert rows[0][-1] == f"{_row('fa3', 2.0)['tflops']:.1f}"


# -------------------------------------------------------------------------------------- tour

def test_tour_compares_the_references(monkeypatch):
    import reference.flash_forward as ff

    calls = []
    real = ff.flash_attention_forward

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ff, "flash_attention_forward", spy)
    rows = {r["name"]: r for r in tour.compare(200)}
    assert len(calls) == 2 and all(kw["causal"] is True for *_, kw in calls)
    assert calls[0][:2] == ((1, 200, 4, 128), (1, 200, 1, 128))  # GQA slice: 4 query heads, 1 KV head
    f64, f32 = rows["tiled f64 (twin 01)"], rows["tiled f32 (twin 01)"]
    fp16 = rows["baseline FP16 (Tab. 3)"]
    assert f64["max_err"] < 1e-12 and f64["lse_max_err"] < 1e-12
    assert 0 < f32["max_err"] < 1e-4
    assert fp16["rmse"] > 10 * f32["rmse"] and fp16["max_err"] < 0.1


def test_tour_inputs_are_bf16_values():
    import ml_dtypes

    q, k, v = tour.make_inputs(64)
    for x in (q, k, v):
        assert np.array_equal(x, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    q2, _, _ = tour.make_inputs(64)
    assert np.array_equal(q, q2)


def test_tour_cpu_end_to_end(capsys, tmp_path):
    """Live, then recorded, a picture saved and its path printed, the terms, and where to go next."""
    assert cli.main(["tour", "--cpu", "--seqlen", "130", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, _ in tour.implementations():
        assert name in out
    assert "seqlen 130" in out and "Live:" in out and "Recorded:" in out
    if results.load_all():
        assert "Current run on" in out
        pngs = list(tmp_path.glob("fig5_*.png"))
        assert len(pngs) == 1 and pngs[0].stat().st_size > 10_000
        assert str(pngs[0]) in out.replace("\n", "")
    else:
        assert "No GPU results are recorded yet" in out
    for term, _ in tour.TERMS:
        assert term in out
    assert f"next: open {tour.NEXT}" in out


def test_tour_on_sm90_without_the_kernel_part(monkeypatch, capsys):
    monkeypatch.setattr(_env, "sm90_gpu", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setitem(sys.modules, "fa3_lab.lab.tour_gpu", None)  # import fails: not built
    assert cli.main(["tour", "--seqlen", "64"]) == 0
    out = capsys.readouterr().out
    assert "not built" in out and "tiled f32 (twin 01)" in out


def test_tour_on_sm90_calls_tour_gpu(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("fa3_lab.lab.tour_gpu")
    fake.run = lambda console: seen.append(console) or 3
    monkeypatch.setattr(_env, "sm90_gpu", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setitem(sys.modules, "fa3_lab.lab.tour_gpu", fake)
    assert cli.main(["tour"]) == 3
    assert len(seen) == 1 and "flash f32" not in capsys.readouterr().out
    # --cpu forces the NumPy part even there
    assert cli.main(["tour", "--cpu", "--seqlen", "16"]) == 0 and len(seen) == 1


def test_schema_step_impls_come_from_the_registry():
    from fa3_lab import registry

    assert results.STEP_IMPLS == tuple(f"step{s.id:02d}" for s in registry.STEPS)
    results.validate({"meta": _meta(), "rows": [_row(f"step{registry.DEFAULT_STEP:02d}")]})
    with pytest.raises(results.SchemaError, match="impl"):
        results.validate({"meta": _meta(), "rows": [_row("step99")]})


def test_schema_backward_rows_count_two_and_a_half_forward_flops():
    fwd = _row("cudnn", 1.0)
    bwd = _row("cudnn", 1.0, **{"pass": "bwd"})
    both = _row("cudnn", 1.0, **{"pass": "fwd_bwd"})
    assert bwd["tflops"] == pytest.approx(2.5 * fwd["tflops"], rel=1e-3)
    assert both["tflops"] == pytest.approx(3.5 * fwd["tflops"], rel=1e-3)
    results.validate({"meta": _meta(), "rows": [fwd, bwd, both]})
    with pytest.raises(results.SchemaError, match="tflops"):  # a backward row timed as if it were a forward
        results.validate({"meta": _meta(), "rows": [dict(bwd, tflops=fwd["tflops"])]})
    with pytest.raises(results.SchemaError, match=r"pass"):
        results.validate({"meta": _meta(), "rows": [dict(fwd, **{"pass": "backward"})]})


def test_bench_backward_on_cpu_says_it_needs_a_gpu(capsys):
    from fa3_lab.lab import cli

    assert cli.main(["bench", "--backward", "--no-save"]) == 1  # no sm_90 GPU here: says so, exit 1
    assert "needs an sm_90 GPU" in capsys.readouterr().out


def test_bench_backward_passes_are_named_or_refused():
    from fa3_lab.lab import bench
    from fa3_lab.lab.cli import UsageError

    assert bench.backward_passes("fwd_bwd,bwd") == ("bwd", "fwd_bwd")  # the schema's order, whatever was typed
    assert bench.backward_passes("bwd") == ("bwd",)
    for bad in ("", "fwd", "bwd,backward"):
        with pytest.raises(UsageError, match="--passes: expected a comma list from bwd,fwd_bwd"):
            bench.backward_passes(bad)
    with pytest.raises(UsageError, match="passes: expected a non-empty subset"):  # refused before any GPU work
        bench.run_backward_grid([], [25], passes=("fwd",))
