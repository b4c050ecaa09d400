"""The pieces of the end-to-end benchmark (fastpo.bench.e2e): the model's tokenizer and
data, the same-configuration check of fastpo's and TRL's configs, the rows in the
suite's format, and the note when TRL is absent. Nothing here trains or times a step."""

import csv
import dataclasses
import importlib.util
import sys
import types

import pytest

from fastpo.bench import e2e, peers, suite

GRPO, DPO = e2e.CASES[0], e2e.CASES[2]  # grpo with beta = 0, dpo
SMALL_VOCAB = 400  # 3 special tokens + 256 byte symbols + 141 words


# ------------------------------------------------------------------ model and data


def test_word_tokens_fill_the_real_vocabulary_and_every_prefix_comes_first():
    words = e2e._word_tokens(e2e.VOCAB)
    assert len(words) == e2e.VOCAB - len(e2e.SPECIAL) - 256 == 151677
    assert len(set(words)) == len(words)
    seen = set()
    for word in words[:2000] + words[-2000:]:
        assert word[0] == "\u0120" and word[1:].isalpha() and 2 <= len(word) <= 5
    for word in words:
        assert len(word) == 2 or word[:-1] in seen  # the merge (prefix, letter) has its prefix
        seen.add(word)
    with pytest.raises(ValueError, match="too small"):
        e2e._word_tokens(270)


def test_tokenizer_encodes_each_generated_word_as_one_token():
    tokenizer = e2e.build_tokenizer(SMALL_VOCAB)
    assert len(tokenizer) == SMALL_VOCAB
    assert tokenizer.bos_token_id is None and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    small = dataclasses.replace(DPO, prompt_len=5, completion_len=4)
    (row,) = e2e.make_rows(small, 1, seed=3, vocab_size=SMALL_VOCAB)
    prompt = tokenizer(row["prompt"])["input_ids"]
    assert len(prompt) == 5 and all(i >= len(e2e.SPECIAL) + 256 for i in prompt)
    # TRL tokenizes prompt + response + "<eos>" as one string; fastpo encodes them apart.
    whole = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
    apart = prompt + tokenizer.encode(row["chosen"], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert whole == apart and len(whole) == 5 + 4
    assert tokenizer.decode(prompt) == row["prompt"]


def test_make_rows_and_write_data(tmp_path):
    rows = e2e.make_rows(GRPO, 3, seed=0, vocab_size=SMALL_VOCAB)
    assert [sorted(r) for r in rows] == [["prompt"]] * 3
    assert all(len(r["prompt"].split()) == GRPO.prompt_len and r["prompt"].startswith(" ") for r in rows)
    assert rows == e2e.make_rows(GRPO, 3, seed=0, vocab_size=SMALL_VOCAB)  # seeded
    pairs = e2e.make_rows(DPO, 2, seed=0, vocab_size=SMALL_VOCAB)
    assert all(len(r["chosen"].split()) == DPO.completion_len - 1 for r in pairs)
    paths = e2e.write_data(GRPO, tmp_path, steps=3, vocab_size=SMALL_VOCAB)
    with open(paths["train"]) as f:
        assert len(f.readlines()) == 3 * GRPO.prompts_per_step  # enough prompts for 3 steps
    with open(paths["eval"]) as f:
        assert len(f.readlines()) == e2e.EVAL_ROWS


def test_model_dir_loads_back_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    folder = e2e.build_model_dir(tmp_path / "model", vocab_size=SMALL_VOCAB)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen2" and config.vocab_size == SMALL_VOCAB
    assert config.hidden_size == 256 and config.num_hidden_layers == 2 and config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(folder)  # what both trainers do
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == SMALL_VOCAB
    assert tokenizer(" a ab")["input_ids"] == e2e.build_tokenizer(SMALL_VOCAB)(" a ab")["input_ids"]


def test_reward_is_the_share_of_words_from_a_to_m():
    assert e2e.first_half_reward(["p"] * 3, [" abc zed", " nope", ""]) == [0.5, 0.0, 0.0]


# ------------------------------------------------------------ same configuration


def _fastpo_config(case, **changes):
    from fastpo.engine.config import config_class, from_dict

    paths = {"train": "train.jsonl", "eval": "eval.jsonl"}
    options = {**e2e.fastpo_options(case, paths, "model", "out", steps=6), **changes}
    return from_dict(config_class(case.algorithm), options)


def _trl_like(case, **changes):
    """What TRL's config objects hold after their __post_init__, without importing TRL."""
    options = {**e2e.trl_options(case, "out", steps=6), **changes}
    values = dict(options, lr_scheduler_type=types.SimpleNamespace(value="constant"), epsilon_high=None,
                  activation_checkpointing=options["gradient_checkpointing"])
    if case.algorithm == "grpo":
        values["generation_batch_size"] = options["per_device_train_batch_size"]
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize("case", e2e.CASES, ids=lambda c: f"{c.algorithm}-beta{c.beta:g}")
def test_both_sides_describe_the_case(case):
    fastpo = e2e.describe_fastpo(case.algorithm, _fastpo_config(case))
    trl = e2e.describe_trl(case.algorithm, _trl_like(case))
    assert e2e.check_config(case, fastpo) == [] and e2e.check_config(case, trl) == []
    assert e2e.differences(fastpo, trl) == []
    if case.algorithm == "grpo":
        assert (fastpo["batch"], fastpo["group"], fastpo["completion_len"]) == (8, 4, 32)
        assert fastpo["reference_model"] is (case.beta > 0) and trl["reference_model"] is (case.beta > 0)
    else:
        assert fastpo["batch"] == 4 and fastpo["reference"] == "precomputed"


def test_a_difference_is_named():
    fastpo = e2e.describe_fastpo("grpo", _fastpo_config(GRPO, num_generations=8, prompts_per_rollout=1))
    assert e2e.check_config(GRPO, fastpo) == ["group: 4 != 8"]
    trl = e2e.describe_trl("grpo", _trl_like(GRPO, bf16=True, optim="adamw_torch_fused", max_completion_length=16))
    assert e2e.check_config(GRPO, trl) == ["completion_len: 32 != 16", "dtype: 'fp32' != 'bf16'"]
    assert "optimizer: '<absent>' != 'adamw_torch_fused'" in e2e.differences(
        e2e.describe_fastpo("grpo", _fastpo_config(GRPO)), trl)
    dpo = e2e.describe_trl("dpo", _trl_like(DPO, precompute_ref_log_probs=False))
    assert "reference: 'precomputed' != 'model every step'" in e2e.differences(
        e2e.describe_fastpo("dpo", _fastpo_config(DPO)), dpo)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
@pytest.mark.parametrize("case", e2e.CASES, ids=lambda c: f"{c.algorithm}-beta{c.beta:g}")
def test_the_real_trl_configs_match_fastpo(case, tmp_path):
    import trl

    config_cls = trl.GRPOConfig if case.algorithm == "grpo" else trl.DPOConfig
    args = e2e.make_trl_config(config_cls, e2e.trl_options(case, str(tmp_path), steps=6))
    trl_side = e2e.describe_trl(case.algorithm, args)
    assert e2e.check_config(case, trl_side) == []
    assert e2e.differences(e2e.describe_fastpo(case.algorithm, _fastpo_config(case)), trl_side) == []


def test_the_fastpo_child_can_skip_the_checkpoint():
    from fastpo.engine import loop

    assert callable(loop._save_checkpoint)  # the child replaces it to skip writing


# ------------------------------------------------------------------- the rows


def _result(median_s=2.0, peak=3 * 2**30, prompt=32, completion=32.0, config=None):
    times = [median_s * 0.9, median_s, median_s * 1.1]
    return {"timing": e2e._timing(times), "config": config or {"batch": 8}, "baseline_bytes": 2**30,
            "peak_bytes": peak, "observed": {"prompt_tokens": prompt, "completion_tokens": completion}}


def test_timing_is_the_median_and_percentiles_in_ms():
    assert e2e._timing([3.0, 1.0, 2.0, 5.0, 4.0]) == {"median_ms": 3000.0, "p20_ms": 1800.0, "p80_ms": 4200.0}
    with pytest.raises(ValueError):
        e2e._timing([])


def test_case_rows_in_the_suite_format(tmp_path):
    rows = [e2e.case_row(GRPO, "fastpo", _result(median_s=1.0, peak=2 * 2**30)),
            e2e.case_row(GRPO, "trl", _result(median_s=3.0)),
            e2e.case_row(DPO, "fastpo", _result()),
            e2e.case_row(DPO, "trl", {"error": "trl skipped: not importable"})]
    with_fastpo = e2e.case_row(GRPO, "trl+fastpo", _result(median_s=2.0, peak=1.5 * 2**30))
    e2e.add_ratios(rows + [with_fastpo])
    assert with_fastpo["kind"] == "fastpo"
    assert with_fastpo["note"].endswith("TRL stock/with fastpo.integrations.trl: time 1.50x, extra memory 4.00x")
    first = rows[0]
    assert first["suite"] == "e2e" and first["kind"] == "fastpo" and first["pass"] == "step"
    assert first["shape"] == ("algo=grpo,batch=8,group=4,prompt=32,completion=32,lr=1e-05,beta=0,"
                              "vocab=151936,hidden=256,layers=2")
    assert first["tokens"] == 8 * 64 and rows[2]["tokens"] == 2 * 4 * 64
    assert first["median_ms"] == pytest.approx(1000.0) and first["extra_mem_MiB"] == 1024.0
    assert "prompt 32, completion 32" in first["note"]
    assert first["note"].endswith("TRL/fastpo: time 3.00x, extra memory 2.00x")
    assert rows[1]["kind"] == "peer" and "TRL/fastpo" not in rows[1]["note"]
    assert "TRL/fastpo" not in rows[2]["note"]  # no TRL time to compare with
    assert rows[3] == {**{k: rows[3][k] for k in ("suite", "impl", "kind", "dtype", "shape", "tokens", "plot")},
                       "note": "trl skipped: not importable"}

    env = {"date": "2026-11-27", "device": "CPU (2 cores)"}
    path = tmp_path / "out.csv"
    suite.write_csv(rows, env, str(path))
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert [r["impl"] for r in read] == ["fastpo", "trl", "fastpo", "trl"]
    assert read[0]["pass"] == "step" and float(read[0]["median_ms"]) == 1000.0 and read[3]["median_ms"] == ""
    report = suite.markdown_report(rows, env, {}, [])
    assert "## e2e" in report.splitlines()
    assert any(line.startswith("| fastpo | fastpo | fp32 | algo=grpo,batch=8,group=4,") for line in report.splitlines())
    paths, note = suite.write_plots(rows, str(tmp_path), "run")
    assert paths == []  # one point per implementation: no plot


def test_compare_catches_different_configs_and_lengths():
    ok = {"fastpo": _result(), "trl": _result()}
    assert e2e.compare(GRPO, ok) == []
    sampled = {"fastpo": _result(completion=31.5), "trl": _result(completion=32.0)}
    assert e2e.compare(GRPO, sampled) == []  # sampled lengths are only equal in distribution
    assert e2e.compare(DPO, sampled) == ["completion_tokens: fastpo 31.5 != trl 32"]
    differ = {"fastpo": _result(config={"batch": 8}), "trl": _result(config={"batch": 16}, prompt=33)}
    assert e2e.compare(DPO, differ) == ["config batch: 8 != 16", "prompt_tokens: fastpo 32 != trl 33"]
    assert e2e.compare(DPO, {"fastpo": _result(), "trl": {"error": "x"}}) == []
    three = {"fastpo": _result(), "trl": _result(), "trl+fastpo": _result(prompt=31)}
    assert e2e.compare(DPO, three) == ["prompt_tokens: fastpo 32 != trl+fastpo 31"]


def test_selected_in_full_runs_and_by_name_not_in_quick_runs():
    assert e2e.selected(None, quick=False)
    assert not e2e.selected(None, quick=True)
    assert e2e.selected(["e2e"], quick=True) and e2e.selected(["token_logprobs", "e2e"], quick=False)
    assert not e2e.selected(["token_logprobs"], quick=False)
    assert suite.NAMES[-1] == "e2e" and set(suite.SUITES) < set(suite.NAMES)


# ------------------------------------------------------------ TRL absent: a note


def test_trl_status_without_trl(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import raises ImportError
    available, note = e2e.trl_status()
    assert not available and note.startswith("trl skipped: not importable (") and note.endswith("; pip install trl")
    for name in ("trl.trainer", "trl.trainer.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    found = peers.discover_peers("cpu")
    available, note = e2e.trl_status(found)
    assert not available and note.startswith("trl skipped: not importable") and "pip install trl" in note


def test_trl_status_with_an_old_trl(monkeypatch):
    old = types.ModuleType("trl")
    old.__version__ = "0.1"
    old.GRPOConfig = old.DPOConfig = old.DPOTrainer = object
    monkeypatch.setitem(sys.modules, "trl", old)
    assert e2e.trl_status() == (False, "trl skipped: trl 0.1 has no GRPOTrainer")


def test_run_without_trl_times_fastpo_and_notes_the_skip(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)
    children = []

    def fake_child(module, args):
        children.append((module, args["impl"], args["case"]["algorithm"]))
        return _result()

    monkeypatch.setattr(e2e.harness, "run_child", fake_child)
    monkeypatch.setattr(e2e, "build_model_dir", lambda folder, vocab_size: folder)  # no model needed
    rows, notes = e2e.run("cpu", reps=2)
    assert children == [("fastpo.bench.e2e", "fastpo", case.algorithm) for case in e2e.CASES]
    assert [(r["impl"], "median_ms" in r) for r in rows] == [
        ("fastpo", True), ("trl", False), ("trl+fastpo", False)] * len(e2e.CASES)
    assert all(r["note"].startswith("trl skipped: not importable") for r in rows if r["impl"] != "fastpo")
    assert len(notes) == 1 and notes[0].startswith("e2e: trl skipped: not importable") and "pip install trl" in notes[0]


def test_quick_runs_the_small_cases_once(monkeypatch):
    children = []

    def fake_child(module, args):
        children.append((args["impl"], args["case"]["vocab_size"], args["reps"]))
        return _result()

    monkeypatch.setattr(e2e.harness, "run_child", fake_child)
    monkeypatch.setattr(e2e, "build_model_dir", lambda folder, vocab_size: folder)
    monkeypatch.setattr(e2e, "trl_status", lambda peers=None: (True, "trl 1.0"))
    rows, _ = e2e.run("cpu", quick=True)
    assert children == [(impl, 4096, e2e.QUICK_REPS) for _ in e2e.QUICK_CASES for impl in e2e.IMPLEMENTATIONS]
    assert all("vocab=4096" in row["shape"] for row in rows)


def test_a_crashed_child_is_a_note_row(monkeypatch):
    def crash(module, args):
        raise RuntimeError("benchmark child failed:\nTraceback ...\nMemoryError: out of memory")

    monkeypatch.setattr(e2e.harness, "run_child", crash)
    monkeypatch.setattr(e2e, "build_model_dir", lambda folder, vocab_size: folder)
    monkeypatch.setattr(e2e, "trl_status", lambda peers=None: (True, "trl 1.0"))
    rows, notes = e2e.run("cpu", reps=1, cases=(DPO,))
    assert [r["note"] for r in rows] == ["child process failed: MemoryError: out of memory"] * 3 and notes == []


def test_other_devices_get_a_note():
    assert e2e.run("cuda") == ([], ["e2e: not measured on cuda; the end-to-end cases run on the CPU only"])
