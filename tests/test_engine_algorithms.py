"""Training forward passes, SFT and DPO on builtin:tiny, and the runner's dispatch."""

import json
import math

import pytest
import torch

from fastpo.engine import ConfigError, train
from fastpo.engine.forward import IGNORE_INDEX, encode_responses, response_logprobs
from fastpo.engine.models import load_causal_lm
from fastpo.engine.task import AdditionTask

QUICK = {"batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "warm_start_steps": 0}


def _losses(summary):
    with open(summary["metrics_file"]) as f:
        return [json.loads(line)["loss"] for line in f]


def _pairs_file(path, n=16):
    rows = AdditionTask(seed=5).preference_pairs(n)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_encode_responses_masks_the_prompt_and_padding():
    _, tokenizer = load_causal_lm("builtin:tiny")
    batch = encode_responses(tokenizer, ["12+34=", "1+2="], ["46", "3"], max_length=64)
    ids = lambda text: [tokenizer.convert_tokens_to_ids(c) for c in text]  # noqa: E731
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[bos, *ids("12+34=46"), eos], [bos, *ids("1+2=3"), eos, pad, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    # labels[t] is the token at t + 1 when it belongs to the response (eos included)
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [ignore] * 6 + [*ids("46"), eos, ignore],
        [ignore] * 4 + [*ids("3"), eos] + [ignore] * 4,
    ]
    cut = encode_responses(tokenizer, ["12+34="], ["46"], max_length=8)  # bos + 6 prompt chars + "4"
    assert cut["input_ids"].shape == (1, 8) and cut["labels"].tolist() == [[ignore] * 6 + [ids("4")[0], ignore]]


def test_response_logprobs_match_the_models_own_logits():
    model, tokenizer = load_causal_lm("builtin:tiny", seed=1)
    batch = encode_responses(tokenizer, ["12+34=", "7+8=", "99+1="], ["46", "15", "100"], max_length=64)
    got = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    # Independent reference: the full logits of model(...) in float64, log-softmaxed.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    valid = batch["labels"] != IGNORE_INDEX
    want = logits.log_softmax(-1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0] * valid
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got[~valid].abs().max() == 0
    got.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_sft_on_the_builtin_task_reduces_the_loss(tmp_path):
    summary = train("sft", {**QUICK, "steps": 25, "learning_rate": 3e-3, "output_dir": str(tmp_path)})
    losses = _losses(summary)
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    for key in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["algorithm"] == "sft" and summary["run_dir"] == str(tmp_path)
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logprobs_equal_the_unpacked_rows(attention):
    from fastpo.engine.algorithms.sft import pack_rows, packed_logprobs

    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    model.set_attn_implementation(attention)
    prompts, completions = ["12+34=", "7+8=", "99+1=", "5+5=", "10+90=", "3+4="], ["46", "15", "100", "10", "100", "7"]
    rows = encode_responses(tokenizer, prompts, completions, max_length=64)
    lengths = rows["attention_mask"].sum(dim=1).tolist()
    assert lengths == [10, 8, 10, 8, 11, 7]  # bos, prompt, completion, eos
    packed = pack_rows(rows, max_length=28, pad_token_id=tokenizer.pad_token_id)
    # First fit in order: rows 0, 1, 2 fill the first sequence (28 tokens), rows 3, 4, 5
    # the second (26 tokens and 2 of padding, segment -1).
    assert packed["input_ids"].shape == (2, 28)
    assert packed["segments"].tolist() == [[0] * 10 + [1] * 8 + [2] * 10, [0] * 8 + [1] * 11 + [2] * 7 + [-1] * 2]
    assert packed["position_ids"][1].tolist() == [*range(8), *range(11), *range(7), 0, 0]
    assert packed["input_ids"][1, -2:].tolist() == [tokenizer.pad_token_id] * 2
    unpacked = response_logprobs(model, rows["input_ids"], rows["attention_mask"], rows["labels"])
    got = packed_logprobs(model, packed)
    starts = {0: (0, 0), 1: (0, 10), 2: (0, 18), 3: (1, 0), 4: (1, 8), 5: (1, 19)}  # row: (sequence, offset)
    for row, (sequence, offset) in starts.items():
        n = lengths[row]
        assert packed["labels"][sequence, offset : offset + n].tolist() == rows["labels"][row, :n].tolist()
        torch.testing.assert_close(got[sequence, offset : offset + n], unpacked[row, :n], rtol=1e-5, atol=1e-5)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((rows["labels"] != IGNORE_INDEX).sum())


def test_a_packed_row_ignores_the_rows_before_it():
    """Changing the first row of a packed sequence leaves the second row's log-probs as
    they are (the block-diagonal mask), and the second row starts at position 0."""
    from fastpo.engine.algorithms.sft import pack_rows, packed_logprobs

    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    first = pack_rows(encode_responses(tokenizer, ["1+1=", "12+34="], ["2", "46"], 64), 64, tokenizer.pad_token_id)
    other = pack_rows(encode_responses(tokenizer, ["9+9=", "12+34="], ["18", "46"], 64), 64, tokenizer.pad_token_id)
    assert first["input_ids"].shape[0] == other["input_ids"].shape[0] == 1
    tail_first, tail_other = packed_logprobs(model, first)[0, -10:], packed_logprobs(model, other)[0, -10:]
    assert tail_first.abs().sum() > 0
    torch.testing.assert_close(tail_first, tail_other, rtol=1e-5, atol=1e-5)


def test_sft_with_packing_learns_a_data_file(tmp_path):
    rows = [{"prompt": f"say {w}:", "completion": w} for w in ("yes", "no", "maybe", "ok")] * 4
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = train("sft", {**QUICK, "packing": True, "steps": 40, "batch_size": 16, "learning_rate": 1e-2,
                            "data": str(path), "eval_data": str(path), "output_dir": str(tmp_path / "run")})
    records = [json.loads(line) for line in open(summary["metrics_file"])]
    # The unit is still the completion token: 4 rows of each word, its letters and eos.
    assert records[0]["units"] == 4 * (4 + 3 + 6 + 3)
    assert summary["heldout_accuracy_before"] == 0.0
    assert summary["heldout_accuracy_after"] == 1.0  # four memorized answers


def test_dpo_learns_a_small_preference_set(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    summary = train("dpo", {**QUICK, "data": pairs, "eval_data": pairs, "steps": 12, "learning_rate": 3e-3,
                            "beta": 0.5, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    # The untrained policy equals its reference: every implicit reward ties, scored 1/2.
    assert summary["preference_accuracy_before"] == 0.5
    assert summary["preference_accuracy_after"] >= 0.8


@pytest.mark.parametrize(
    "options, first_loss",
    [
        # h = 0 at the first step (policy == reference); hand-computed values of each loss there:
        ({"loss_type": "sigmoid"}, math.log(2)),  # -log sigmoid(0)
        ({"loss_type": "sigmoid", "label_smoothing": 0.2}, math.log(2)),  # (0.8 + 0.2) * log 2
        ({"loss_type": "hinge"}, 1.0),  # max(0, 1 - 0)
        ({"loss_type": "robust", "label_smoothing": 0.2}, math.log(2)),  # (0.8 - 0.2) log 2 / (1 - 0.4)
        ({"loss_type": "ipo", "beta": 0.25}, 4.0),  # (0 - 1 / (2 * 0.25))**2
        ({"loss_type": "ipo", "beta": 0.25, "average": True}, 4.0),
    ],
)
def test_dpo_loss_types_on_the_builtin_task(tmp_path, options, first_loss):
    summary = train("dpo", {**QUICK, "steps": 2, "output_dir": str(tmp_path), **options})
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert _losses(summary)[0] == pytest.approx(first_loss, abs=1e-4)
    assert summary["preference_accuracy_before"] == 0.5 and "preference_accuracy_after" in summary


@pytest.mark.parametrize("average", [False, True])
def test_rpo_alpha_adds_the_chosen_responses_nll_per_token(tmp_path, average):
    # Step 1: policy == reference, so the sigmoid term is log 2 whatever `average` does to
    # the log-probs; the NLL term is the chosen response's mean -log p per token (eos
    # included), recomputed here in float64 from the initial model.
    data = _pairs_file(tmp_path / "pairs.jsonl", n=4)  # one batch holds every pair
    alpha = 0.5
    summary = train("dpo", {**QUICK, "data": data, "eval_data": data, "batch_size": 4, "steps": 1,
                            "rpo_alpha": alpha, "average": average, "output_dir": str(tmp_path / "run")})
    model, tokenizer = load_causal_lm("builtin:tiny", seed=0)
    rows = [json.loads(line) for line in open(data)]
    nll = [-_hand_sequence_logprob(model.double(), tokenizer, r["prompt"], r["chosen"])
           / (len(tokenizer.encode(r["chosen"], add_special_tokens=False)) + 1) for r in rows]
    assert _losses(summary)[0] == pytest.approx(math.log(2) + alpha * sum(nll) / len(nll), rel=1e-5)


def test_dpo_rejects_label_smoothing_where_the_loss_has_none(tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing.*hinge"):
        train("dpo", {"loss_type": "hinge", "label_smoothing": 0.1, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="label_smoothing.*< 0.5"):
        train("dpo", {"loss_type": "robust", "label_smoothing": 0.5, "output_dir": str(tmp_path)})


def _ranked_file(path, n, k=3):
    rows = AdditionTask(seed=5).rankings(n, k=k)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), rows


def _hand_sequence_logprob(model, tokenizer, prompt, response):
    """log p(response + eos | bos + prompt) in float64 from the model's full logits."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt + response, add_special_tokens=False)]
    ids.append(tokenizer.eos_token_id)
    start = 1 + len(tokenizer.encode(prompt, add_special_tokens=False))  # first response token
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_dpo_plackett_luce_losses_by_hand(tmp_path):
    """Ranked rows train with the Plackett-Luce loss: step 1's loss is log K! (policy ==
    reference), step 2's is recomputed here in float64 from the step-1 checkpoint and
    the initial model (the frozen reference)."""
    from transformers import AutoModelForCausalLM

    data, rows = _ranked_file(tmp_path / "ranked.jsonl", n=4)  # one batch holds every row
    beta = 0.5
    summary = train("dpo", {**QUICK, "data": data, "eval_data": data, "batch_size": 4, "steps": 2, "beta": beta,
                            "learning_rate": 3e-3, "save_every": 1, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert losses[0] == pytest.approx(math.log(6), abs=1e-5)  # -log(1/3) - log(1/2), K = 3
    reference, tokenizer = load_causal_lm("builtin:tiny", seed=0)
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run/checkpoints/step-00000001/model")).double()
    reference = reference.double()
    want = 0.0
    for row in rows:
        h = [beta * (_hand_sequence_logprob(policy, tokenizer, row["prompt"], r)
                     - _hand_sequence_logprob(reference, tokenizer, row["prompt"], r)) for r in row["responses"]]
        # -sum_k log(exp(h_k) / sum_{j >= k} exp(h_j)), over every position but the last
        want += sum(math.log(sum(math.exp(x) for x in h[k:])) - h[k] for k in range(len(h) - 1))
    assert losses[1] != pytest.approx(losses[0], abs=1e-3)  # the policy moved
    assert losses[1] == pytest.approx(want / len(rows), rel=1e-4)
    # The held-out pairs of ranked eval rows: 3 ordered pairs per row, all tied before training.
    assert summary["preference_accuracy_before"] == 0.5


def test_dpo_learns_a_small_ranked_set(tmp_path):
    data, _ = _ranked_file(tmp_path / "ranked.jsonl", n=16)
    summary = train("dpo", {**QUICK, "data": data, "eval_data": data, "steps": 20, "learning_rate": 3e-3,
                            "beta": 0.5, "output_dir": str(tmp_path / "run")})
    records = [json.loads(line) for line in open(summary["metrics_file"])]
    assert records[-1]["reward_accuracy"] > 0.8 and records[-1]["reward_margin"] > 0
    assert summary["preference_accuracy_after"] >= 0.8  # of the 48 ordered pairs


def test_dpo_ranked_rows_take_only_the_plackett_luce_loss(tmp_path):
    data, _ = _ranked_file(tmp_path / "ranked.jsonl", n=4)
    with pytest.raises(ConfigError, match="'loss_type'.*hinge.*Plackett-Luce"):
        train("dpo", {**QUICK, "data": data, "loss_type": "hinge", "output_dir": str(tmp_path / "run")})
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text(json.dumps({"prompt": "1+1=", "responses": ["2", "3"]}) + "\n"
                      + json.dumps({"prompt": "1+2=", "responses": ["3", "4", "5"]}) + "\n")
    with pytest.raises(ValueError, match="row 2: field 'responses' holds 3"):
        train("dpo", {**QUICK, "data": str(ragged), "output_dir": str(tmp_path / "run")})


def test_dpo_starts_from_an_sft_checkpoint(tmp_path):
    sft = train("sft", {**QUICK, "steps": 4, "output_dir": str(tmp_path / "sft")})
    dpo = train("dpo", {**QUICK, "steps": 2, "model": sft["checkpoint"] + "/model", "output_dir": str(tmp_path / "dpo")})
    # The same held-out prompts and the same weights: the same greedy accuracy.
    assert dpo["heldout_accuracy_before"] == sft["heldout_accuracy_after"]
    assert dpo["status"] == "completed"


def test_sft_on_a_data_file_evaluates_by_exact_match(tmp_path):
    rows = [{"prompt": f"say {w}:", "completion": w} for w in ("yes", "no", "maybe", "ok")] * 4
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = train("sft", {**QUICK, "steps": 40, "batch_size": 16, "learning_rate": 1e-2, "data": str(path),
                            "eval_data": str(path), "output_dir": str(tmp_path / "run")})
    assert summary["heldout_accuracy_before"] == 0.0
    assert summary["heldout_accuracy_after"] == 1.0  # four memorized answers


def test_cli_trains_and_prints_one_json_summary(tmp_path, capsys):
    from fastpo.engine import cli

    assert cli.main(["sft", "steps=2", "batch_size=4", f"output_dir={tmp_path}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    summary = json.loads(lines[-1])
    assert summary["algorithm"] == "sft" and summary["steps"] == 2 and summary["status"] == "completed"


def test_a_local_checkpoint_with_tied_embeddings_trains_and_resumes(tmp_path):
    """A Qwen2-style model built from a config here (tied LM head, no download): it
    trains, checkpoints and resumes (save_pretrained writes the tied weight once)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastpo.engine.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    run = {**QUICK, "model": str(tmp_path / "qwen"), "save_every": 2, "output_dir": str(tmp_path / "run")}
    first = train("dpo", {**run, "steps": 2})
    resumed = train("dpo", {**run, "steps": 4, "resume": True})
    assert first["steps"] == 2 and resumed["steps"] == 4
    records = [json.loads(line) for line in open(resumed["metrics_file"])]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
