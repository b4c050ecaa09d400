"""The benchmark suite's pieces: the byte and FLOP models, the result rows and their
CSV / Markdown writers, peer discovery, the correctness guard, and one quick run of
``python -m fastpo.bench`` end to end."""

import csv
import dataclasses
import glob
import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from fastpo.bench import models, peers, suite


# ---------------------------------------------------------------- byte and FLOP models
# Every expected value is worked out by hand in the comment next to it.


def test_token_logprobs_bytes():
    # 2 rows x 10 bf16 logits = 40 bytes; targets 2 x 8; one fp32 output per row = 8.
    # fwd: 40 + 16 + 8 = 64; bwd: logits again 40, targets 16, output grads 8, logits grad 40 = 104.
    assert models.token_logprobs_bytes(2, 10, 2) == {"fwd": 64, "bwd": 104, "fwdbwd": 168}
    # with entropy, two outputs per row: fwd 40 + 16 + 16 = 72; bwd 40 + 16 + 16 + 40 = 112.
    assert models.token_logprobs_bytes(2, 10, 2, entropy=True) == {"fwd": 72, "bwd": 112, "fwdbwd": 184}


def test_logits_kl_bytes():
    # 2 rows x 10 fp32 = 80 bytes per logits tensor. fwd: 2 x 80 + 2 x 4 = 168;
    # bwd: 2 x 80 read + 8 output grads + 80 gradient written = 248.
    assert models.logits_kl_bytes(2, 10, 4) == {"fwd": 168, "bwd": 248, "fwdbwd": 416}


def test_linear_logprobs_flops():
    # (2 x 3) @ (3 x 5): 2 * 2 * 3 * 5 = 60 forward; two matmuls of the same size backward = 120.
    assert models.linear_logprobs_flops(2, 3, 5) == {"fwd": 60, "bwd": 120, "fwdbwd": 180}


def test_linear_loss_flops():
    # 2 tokens, H 3, V 5: the policy head is the log-prob op's 60 forward and 120 backward;
    # a reference model's head adds one more forward matmul, 60, and nothing backward.
    assert models.linear_loss_flops(2, 3, 5) == {"fwd": 60, "bwd": 120, "fwdbwd": 180}
    assert models.linear_loss_flops(2, 3, 5, reference_head=True) == {"fwd": 120, "bwd": 120, "fwdbwd": 240}


def test_elementwise_bytes():
    # policy loss, 2 x 3 tokens: (lp, old, ref: 3 x 4) + mask 1 = 13 per token, 2 advantages x 4:
    # fwd 6 * 13 + 8 = 86; bwd the same reads + 6 x 4 gradient = 110.
    assert models.policy_loss_bytes(2, 3) == {"fwd": 86, "bwd": 110, "fwdbwd": 196}
    # k3 of 5 tokens: fwd 2 reads + 1 write = 12 per token = 60; bwd 3 reads + 1 write = 80.
    assert models.kl_penalty_bytes(5) == {"fwd": 60, "bwd": 80, "fwdbwd": 140}
    # 16 rewards read and 16 advantages written, 4 bytes each.
    assert models.group_advantages_bytes(16) == {"fwd": 128, "bwd": 0, "fwdbwd": 128}
    # GAE, 6 tokens: rewards 4 + values 4 + mask 1 + advantages 4 + returns 4 = 17 per token.
    assert models.gae_bytes(2, 3) == {"fwd": 102, "bwd": 0, "fwdbwd": 102}
    # one pair = 2 rows of 3 tokens: fwd 6 x (4 + 1) + 2 refs x 4 + 1 loss x 4 = 42;
    # bwd 6 x (mask 1 + grad 4) + 1 loss grad x 4 = 34.
    assert models.preference_bytes(1, 3) == {"fwd": 42, "bwd": 34, "fwdbwd": 76}


def test_percent_of_limit():
    # 1e9 bytes in 1000 ms = 1e9 B/s, half of a 2e9 B/s limit.
    assert models.percent_of_limit(1e9, 1000.0, 2e9) == pytest.approx(50.0)
    assert models.percent_of_limit(1e9, 1000.0, None) is None  # no limit measured (CPU)
    assert models.percent_of_limit(0, 1000.0, 2e9) is None  # no backward pass


# ------------------------------------------------------------------ rows and writers


def _measured(median=2.0, extra_bytes=3 * 2**20):
    timings = {p: {"median_ms": median * (i + 1), "p20_ms": median * (i + 1) * 0.9, "p80_ms": median * (i + 1) * 1.1}
               for i, p in enumerate(suite.PASSES)}
    return {"timings": timings, "extra_bytes": extra_bytes}


def test_case_rows_give_one_row_per_pass_and_the_fraction_of_the_limit():
    token = suite.SUITES["token_logprobs"]
    shape = {"tokens": 4, "vocab": 1000}
    bandwidth = 1e9
    rows = suite.case_rows(token, "fastpo_torch", shape, "fp32", _measured(), {"copy_bandwidth": bandwidth})
    assert [r["pass"] for r in rows] == list(suite.PASSES)
    assert all(r["kind"] == "fastpo" and r["shape"] == "vocab=1000" and r["tokens"] == 4 for r in rows)
    work = models.token_logprobs_bytes(4, 1000, 4)
    for row in rows:
        expected = 100.0 * work[row["pass"]] / (row["median_ms"] / 1e3) / bandwidth
        assert row["pct_of_limit"] == pytest.approx(expected)
    # memory is reported once, on the forward+backward row
    assert [r.get("extra_mem_MiB") for r in rows] == [None, None, 3.0]
    noted = suite.case_rows(token, "trl", shape, "fp32", {"error": "not timed: x"}, {})
    assert len(noted) == 1 and noted[0]["note"] == "not timed: x" and noted[0]["kind"] == "peer"
    cpu_rows = suite.case_rows(token, "eager", shape, "fp32", _measured(), {})
    assert all("pct_of_limit" not in r for r in cpu_rows)


def test_kind_and_speedup():
    assert [suite.kind_of(n) for n in ("eager", "eager_fp32", "compile:eager", "fastpo_cpp", "liger")] == [
        "eager", "eager", "compile", "fastpo", "peer"]
    token = suite.SUITES["token_logprobs"]
    shape = {"tokens": 4, "vocab": 1000}
    rows = (suite.case_rows(token, "eager", shape, "fp32", _measured(median=4.0), {})
            + suite.case_rows(token, "fastpo_torch", shape, "fp32", _measured(median=1.0), {}))
    suite.add_speedups(rows)
    assert [r["speedup_vs_eager"] for r in rows if r["impl"] == "fastpo_torch"] == [4.0, 4.0, 4.0]
    assert [r["speedup_vs_eager"] for r in rows if r["impl"] == "eager"] == [1.0, 1.0, 1.0]


def test_csv_and_markdown_writers(tmp_path):
    token = suite.SUITES["token_logprobs"]
    shape = {"tokens": 4, "vocab": 1000}
    rows = (suite.case_rows(token, "eager", shape, "fp32", _measured(), {})
            + suite.case_rows(token, "compile:eager", shape, "fp32", {"error": "torch.compile failed: boom"}, {}))
    env = {"date": "2026-01-02", "device": "CPU (2 cores)", "torch": "2.x"}
    path = tmp_path / "out.csv"
    suite.write_csv(rows, env, str(path))
    with open(path) as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == suite.COLUMNS + ["date", "device", "torch"]
    assert len(read) == 4
    assert float(read[0]["median_ms"]) == 2.0 and read[0]["pass"] == "fwd" and read[0]["date"] == "2026-01-02"
    assert read[3]["note"] == "torch.compile failed: boom" and read[3]["median_ms"] == ""
    status = {"trl": {"available": False, "module": "trl.trainer.utils", "note": "not importable"}}
    report = suite.markdown_report(rows, env, status, ["plots skipped: no matplotlib"])
    lines = report.splitlines()
    assert "date: 2026-01-02, device: CPU (2 cores), torch: 2.x" in lines
    assert "## token_logprobs" in lines and "## peers" in lines
    assert "| " + " | ".join(suite.COLUMNS[1:]) + " |" in lines
    assert any(line.startswith("| compile:eager | compile |") and "torch.compile failed: boom" in line
               for line in lines)
    assert "| trl | False | trl.trainer.utils | not importable |" in lines
    assert "- plots skipped: no matplotlib" in lines


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plots_one_png_per_suite_dtype_and_series(tmp_path):
    token = suite.SUITES["token_logprobs"]
    rows = []
    for n in (4, 8):
        for impl in ("eager", "fastpo_torch"):
            rows += suite.case_rows(token, impl, {"tokens": n, "vocab": 1000}, "fp32", _measured(), {})
    paths, note = suite.write_plots(rows, str(tmp_path), "run")
    assert note is None and [os.path.basename(p) for p in paths] == ["run-token_logprobs-fp32-vocab1000.png"]
    assert os.path.getsize(paths[0]) > 0


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    paths, note = suite.write_plots([], str(tmp_path), "run")
    assert paths == [] and "matplotlib" in note


# -------------------------------------------------------------------- peer discovery


def test_discover_peers_finds_a_present_peer_and_explains_absent_ones(monkeypatch):
    fake = types.ModuleType("fastpo_fake_peer")
    fake.log_probs = lambda: None
    fake.__version__ = "1.2.3"
    monkeypatch.setitem(sys.modules, "fastpo_fake_peer", fake)
    monkeypatch.setitem(sys.modules, "fastpo_absent_peer", None)  # import raises ImportError
    specs = (
        peers.PeerSpec("fake", "fastpo_fake_peer", ("log_probs",), ("cpu", "cuda"), "fake-peer"),
        peers.PeerSpec("incomplete", "fastpo_fake_peer", ("log_probs", "entropy"), ("cpu",), "fake-peer"),
        peers.PeerSpec("absent", "fastpo_absent_peer", ("log_probs",), ("cpu",), "absent-peer"),
        peers.PeerSpec("gpu_only", "fastpo_fake_peer", ("log_probs",), ("cuda",), "fake-peer"),
    )
    found = peers.discover_peers("cpu", specs)
    assert found["fake"] == {"available": True, "installed": True, "module": "fastpo_fake_peer",
                             "note": "version 1.2.3"}
    assert not found["incomplete"]["available"] and "has no entropy" in found["incomplete"]["note"]
    assert not found["absent"]["available"] and not found["absent"]["installed"]
    assert "pip install absent-peer" in found["absent"]["note"]
    assert not found["gpu_only"]["available"] and found["gpu_only"]["installed"]
    assert found["gpu_only"]["note"] == "runs on cuda only, not on cpu"


def test_the_real_peer_list_without_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.setitem(sys.modules, "trl.trainer", None)
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)
    found = peers.discover_peers("cpu")
    assert set(found) == {spec.name for spec in peers.PEERS}
    assert not found["trl"]["available"] and "pip install trl" in found["trl"]["note"]
    for name in ("liger", "flash_attn", "cut_cross_entropy", "quack"):
        assert not found[name]["available"] and "cuda only" in found[name]["note"]
    # Liger's chunked losses are PyTorch code: on the CPU they are found, or their absence explained
    chunked = found["liger_chunked"]
    assert chunked["available"] or "pip install liger-kernel" in chunked["note"]


# ------------------------------------------------------------- the correctness guard


def test_guard_accepts_the_eager_output_and_rejects_a_wrong_or_nan_one():
    kl = suite.SUITES["kl_penalty"]
    inputs = kl.make_inputs({"tokens": 100}, torch.float32, "cpu")
    right = suite._k3(**inputs)
    assert suite.check_outputs(kl, inputs, right, "fp32") is None
    assert "max |error|" in suite.check_outputs(kl, inputs, (right[0] + 1e-2,), "fp32")
    nan = right[0].detach().clone()
    nan[3] = float("nan")
    assert suite.check_outputs(kl, inputs, (nan,), "fp32") is not None
    assert "outputs" in suite.check_outputs(kl, inputs, (right[0], right[0]), "fp32")


def test_guard_checks_the_first_rows_of_row_wise_ops():
    token = suite.SUITES["token_logprobs"]
    inputs = token.make_inputs({"tokens": 20, "vocab": 50}, torch.float32, "cpu")
    (lp,) = suite._token_reference(inputs["logits"].detach(), inputs["targets"])
    assert suite.check_outputs(token, inputs, (lp,), "fp32") is None
    wrong = lp.clone()
    wrong[0] += 1.0  # inside the checked rows
    assert suite.check_outputs(token, inputs, (wrong,), "fp32") is not None


def test_child_reports_a_mismatch_and_a_failed_compile_as_notes(monkeypatch):
    kl = suite.SUITES["kl_penalty"]
    broken = dataclasses.replace(kl, impls=lambda device, peers: {"eager": lambda: lambda lp, ref: (lp * 0,)})
    monkeypatch.setitem(suite.SUITES, "kl_penalty", broken)
    args = {"suite": "kl_penalty", "shape": {"tokens": 64}, "dtype": "fp32", "device": "cpu"}
    assert suite.child({**args, "impl": "eager"})["error"].startswith("not timed: output 0: max |error|")

    def no_compiler(fn, *a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(suite.SUITES, "kl_penalty", kl)
    monkeypatch.setattr(torch, "compile", no_compiler)
    result = suite.child({**args, "impl": "compile:eager"})
    assert result == {"error": "torch.compile failed: RuntimeError: no compiler here"}


def test_child_checks_an_implementation_that_overwrites_its_inputs_against_untouched_ones(monkeypatch):
    # Liger's cross entropy writes its gradient into the logits during the forward pass:
    # its right answer must not be judged against the reference of the overwritten logits.
    token = suite.SUITES["token_logprobs"]

    def overwriting():
        def fn(logits, targets):
            (lp,) = suite._token_reference(logits.detach(), targets)
            logits.data.mul_(0.5)
            return (lp.float().requires_grad_(),)
        return fn

    monkeypatch.setitem(suite.SUITES, "token_logprobs",
                        dataclasses.replace(token, impls=lambda device, peers: {"liger": overwriting}))
    result = suite.child({"suite": "token_logprobs", "impl": "liger", "shape": {"tokens": 16, "vocab": 50},
                          "dtype": "fp32", "device": "cpu", "reps": 1})
    assert "error" not in result, result
    assert result["timings"]["fwd"]["median_ms"] > 0


def test_every_suite_has_shapes_with_tokens_and_a_work_model():
    for name, case in suite.SUITES.items():
        for device in ("cpu", "cuda"):
            for quick in (False, True):
                shapes = case.shapes(device, quick)
                assert shapes, name
                for shape in shapes:
                    unit, work = case.work(shape, 2)
                    assert unit in ("bytes", "flops") and work["fwd"] > 0 and set(work) == set(suite.PASSES)
                    assert shape["tokens"] > 0


# -------------------------------------------------------------------- one real run


def test_quick_run_writes_csv_markdown_and_plot(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fastpo.bench", "--quick", "--only", "token_logprobs", "--out", str(out),
         "--reps", "3", "--compile"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    csvs = glob.glob(str(out / "*.csv"))
    mds = glob.glob(str(out / "*.md"))
    assert len(csvs) == 1 and len(mds) == 1
    with open(csvs[0]) as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r["median_ms"]]
    for kind in ("eager", "fastpo"):
        kind_rows = [r for r in timed if r["kind"] == kind]
        assert {r["pass"] for r in kind_rows} == set(suite.PASSES), kind
        assert all(float(r["median_ms"]) > 0 for r in kind_rows)
    assert all(r["suite"] == "token_logprobs" and r["device"].startswith("CPU") for r in rows)
    # torch.compile rows: timed, or a note saying why not (no C++ compiler, say)
    assert {r["tokens"] for r in rows if r["impl"] == "compile:eager" and (r["median_ms"] or r["note"])} == {"64", "128"}
    with open(mds[0]) as f:
        assert "## token_logprobs" in f.read()
    if importlib.util.find_spec("matplotlib") is not None:
        assert glob.glob(str(out / "*.png"))
