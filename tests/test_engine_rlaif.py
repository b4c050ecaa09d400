"""fastpo rlaif: the judge's debiased preference, the labelled pairs and the training
stages they feed, and the built-in judge."""

import dataclasses
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

from fastpo.engine import warm_start
from fastpo.engine.algorithms import rlaif
from fastpo.engine.config import ConfigError, RLAIFConfig
from fastpo.engine.data import load_dataset
from fastpo.engine.forward import greedy_completions
from fastpo.engine.models import load_causal_lm
from fastpo.engine.runner import train
from fastpo.engine.task import AdditionTask
from fastpo.engine.tokenizer import build_char_tokenizer

TEMPLATE = RLAIFConfig().judge_template
# The learning test's budget: 256 prompts (about 140 labelled pairs at 4 samples each) and
# 50 dpo steps. With the verifier's labels of 512 prompts at 2 samples each (175 pairs), seed
# 0, dpo took held-out exact match from 0.41 to 0.135 at step 50 and 0.13 at 200 without
# rpo_alpha, to 0.615 and 0.625 with 1.
RIGHT_JUDGE_DPO = {"num_prompts": 256, "steps": 50, "eval_every": 0}
# then=reward+ppo's: 1024 prompts (about 580 labelled pairs), 800 reward steps, 100 ppo
# steps. The right judge's labels, seed 0, one thread: the reward model 0.56 -> 0.745,
# held-out exact match 0.41 -> 0.495 (400 reward steps: 0.605, 0.485); the same with ppo's
# own learning rate and beta (3e-4, 0.05) in place of rlaif's (5e-5, 2): 0.41 -> 0.075.
# Seeds 1 and 2 at this budget: 0.47 -> 0.46 (the reward model 0.54) and 0.38 -> 0.43.
RIGHT_JUDGE_REWARD_PPO = {"num_prompts": 1024, "reward_steps": 800, "steps": 100, "eval_every": 0}
# judge_confidence 0.5: the random judges of these tests are rarely confident.
QUICK = {"warm_start_steps": 0, "num_prompts": 16, "max_new_tokens": 4, "steps": 2, "batch_size": 4,
         "log_every": 1, "eval_every": 0, "judge_confidence": 0.5}


class _PositionBiasedJudge(torch.nn.Module):
    """A judge that favours the first position: the logit of "A" is ``scale * good(A's
    answer) + bias``, that of "B" is ``scale * good(B's answer)``. A judge prompt alone: good is correct.
    After a reasoning (``reasoning_sum`` decides the sum its ``generate`` writes, " 12+34=46,
    A: 47, so "): good is equal to the reasoning's sum, right or wrong."""

    def __init__(self, tokenizer, bias, reasoning_sum=lambda a, b: a + b, scale=1.0):
        super().__init__()
        self.tokenizer, self.bias, self.reasoning_sum, self.scale = tokenizer, bias, reasoning_sum, scale
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))
        self.label_ids = [tokenizer.convert_tokens_to_ids(label) for label in rlaif.JUDGE_LABELS]
        self.read_texts = []  # every text whose label was read

    def _label_logits(self, text):
        """The logits of "A" and "B" after ``text`` (recorded in ``read_texts``)."""
        self.read_texts.append(text)
        # DOTALL: a sampled answer may hold a newline (the tokenizer has one)
        prompt, a, b, reasoning = re.fullmatch(r"Q: (.*)\? A: (.*) B: (.*)\. Better:(.*)", text, re.DOTALL).groups()
        if reasoning:
            written = re.fullmatch(r" \d+\+\d+=(\d+), A: \d+, so ", reasoning).group(1)
            good_a, good_b = float(a == written), float(b == written)
        else:
            good_a, good_b = AdditionTask.verify(prompt, a), AdditionTask.verify(prompt, b)
        return torch.tensor([self.scale * good_a + self.bias, self.scale * good_b])

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            last = int(mask.sum()) - 1
            logits[row, last, self.label_ids] = self._label_logits(
                self.tokenizer.decode(ids[: last + 1], skip_special_tokens=True)
            )
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, logits_processor=(),
                 **_):
        """Greedy decoding as ``forward.greedy_tokens`` calls it, each step's logits passed
        through ``logits_processor``: the reasoning, then the label its logits pick, then
        eos (which the reading must cut off)."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in input_ids]
        reasonings = []
        for text in texts:
            x, y, a = re.match(r"Q: (\d+)\+(\d+)=\? A: (\d+)", text).groups()
            reasonings.append(f" {x}+{y}={self.reasoning_sum(int(x), int(y))}, A: {a}, so ")
        # read in row order; a reasoning longer than the budget never reaches its label
        labels = [self._label_logits(t + r) if len(r) < max_new_tokens else None for t, r in zip(texts, reasonings)]
        planned = [self.tokenizer.encode(r, add_special_tokens=False) for r in reasonings]
        sequences, finished = input_ids, torch.zeros(len(texts), dtype=torch.bool)
        for step in range(max_new_tokens):
            scores = torch.full((len(texts), len(self.tokenizer)), -1e9)
            for row, tokens in enumerate(planned):
                if step < len(tokens):
                    scores[row, tokens[step]] = 0.0
                elif step == len(tokens):
                    scores[row, self.label_ids] = labels[row]
                else:
                    scores[row, eos_token_id] = 0.0
            for processor in logits_processor or ():
                scores = processor(sequences, scores)
            chosen = scores.argmax(dim=-1).masked_fill(finished, pad_token_id)
            finished |= chosen == eos_token_id
            sequences = torch.cat([sequences, chosen[:, None]], dim=1)
            if finished.all():
                break
        return sequences


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_swapping_the_order_flips_the_raw_preference_but_not_the_debiased_label():
    tokenizer = build_char_tokenizer()
    judge = _PositionBiasedJudge(tokenizer, bias=2.0)  # the bias outweighs the quality gap of 1
    prompts, right, wrong = ["12+34=", "5+7="], ["46", "12"], ["47", "13"]
    forward, forward_a, forward_b = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, right, wrong)
    swapped, swapped_a, swapped_b = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, wrong, right)
    # Raw: the right answer wins when shown first and loses when shown second.
    assert (forward_a > 0.5).all() and (1 - swapped_a < 0.5).all()
    # Debiased: the right answer wins in both orders, with complementary probabilities.
    expected = 0.5 * (_sigmoid(1 + 2.0) + _sigmoid(1 - 2.0))
    torch.testing.assert_close(forward, torch.full((2,), expected))
    torch.testing.assert_close(swapped, 1 - forward)
    torch.testing.assert_close(forward_b, 1 - swapped_a)


def test_a_reasoning_judge_is_read_after_its_reasoning_in_both_orders():
    tokenizer = build_char_tokenizer()
    prompts, right, wrong = ["12+34=", "5+7="], ["46", "12"], ["47", "13"]
    judge = _PositionBiasedJudge(tokenizer, bias=2.0)
    forward, forward_a, _ = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, right, wrong, reasoning=True)
    swapped, _, _ = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, wrong, right, reasoning=True)
    # Each order's label is read after that order's reasoning, the eos and the label it wrote cut off.
    assert judge.read_texts[0] == "Q: 12+34=? A: 46 B: 47. Better: 12+34=46, A: 46, so "
    assert judge.read_texts[3] == "Q: 5+7=? A: 13 B: 12. Better: 5+7=12, A: 13, so "
    assert (forward_a > 0.5).all()
    torch.testing.assert_close(forward, torch.full((2,), 0.5 * (_sigmoid(1 + 2.0) + _sigmoid(1 - 2.0))))
    torch.testing.assert_close(swapped, 1 - forward)
    # The label follows the reasoning: a judge whose sum is off by one prefers the near miss.
    misled = _PositionBiasedJudge(tokenizer, bias=0.0, reasoning_sum=lambda a, b: a + b + 1)
    preference, _, _ = rlaif.judge_preferences(misled, tokenizer, TEMPLATE, prompts, right, wrong, reasoning=True)
    assert (preference < 0.5).all()


def test_batches_of_the_token_budget_read_each_pair_as_alone(monkeypatch):
    """Labelling batches as many judge prompts as fit ``_JUDGE_FORWARD_TOKENS`` (the rows
    over the longest row's tokens); with a budget of a few rows, prompts of different
    widths spread over several batches, each pair's preference is the one it gets alone."""
    tokenizer = build_char_tokenizer()
    judge = _PositionBiasedJudge(tokenizer, bias=0.5, reasoning_sum=lambda a, b: a + b + (a % 3 == 0))
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (12, 34), (5, 70), (3, 3), (98, 9), (6, 41), (60, 6)]]
    right = [str(sum(map(int, p[:-1].split("+")))) for p in prompts]
    wrong = [str(int(r) + 1) for r in right]
    alone = torch.cat([
        rlaif.judge_preferences(judge, tokenizer, TEMPLATE, [p], [x], [y], reasoning=True)[0]
        for p, x, y in zip(prompts, right, wrong)
    ])
    longest = max(len(tokenizer.encode(TEMPLATE.format(prompt=p, a=x, b=y))) for p, x, y in zip(prompts, right, wrong))
    # the decoding's rows: the prompt, bos, the reasoning's budget and the label's step
    monkeypatch.setattr(rlaif, "_JUDGE_FORWARD_TOKENS", 3 * (longest + 2 + rlaif._REASONING_MAX_TOKENS))
    batches = []  # rows of each decoding call
    decode = judge.generate

    def counted(input_ids, **options):
        batches.append(len(input_ids))
        return decode(input_ids, **options)

    monkeypatch.setattr(judge, "generate", counted)
    judge.read_texts.clear()
    batched, _, _ = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, right, wrong, reasoning=True)
    assert len(judge.read_texts) == 2 * len(prompts) and sum(batches) == 2 * len(prompts)
    assert len(batches) >= 4 and max(batches) < len(prompts)  # several batches in each order
    torch.testing.assert_close(batched, alone)
    misled = torch.tensor([int(p.split("+")[0]) % 3 == 0 for p in prompts])  # their reasoning's sum is off by one
    assert torch.equal(batched < 0.5, misled) and 0 < int(misled.sum()) < len(prompts)


def test_a_reasoning_that_never_ends_is_cut_at_the_budget_and_ended():
    tokenizer = build_char_tokenizer()
    judge = _PositionBiasedJudge(tokenizer, bias=0.0, reasoning_sum=lambda a, b: 10**40)  # never reaches ", so "
    prompt = TEMPLATE.format(prompt="12+34=", a="46", b="47")
    (reasoned,), read = rlaif.reasoned_labels(judge, tokenizer, [prompt])
    assert reasoned.startswith(prompt) and reasoned.endswith(rlaif.REASONING_END)
    assert len(tokenizer.encode(reasoned[len(prompt) : -len(rlaif.REASONING_END)])) == rlaif._REASONING_MAX_TOKENS
    assert read.isnan().all()  # no decoding step read its label: a forward over the ended text does


def test_labels_read_while_decoding_are_a_forward_over_the_reasoned_text(monkeypatch):
    """A real model: the label read from the decoding step after the reasoning (left-padded
    prompts, the KV cache) is the one a forward over prompt and reasoning reads
    (right-padded), rounding apart; rows whose decoding never wrote the reasoning's end are
    read by that forward, so judge_preferences has every row."""
    model, tokenizer = load_causal_lm("builtin:tiny", seed=1)
    answers = [(1, 2), (12, 34), (56, 7), (99, 99), (3, 40), (8, 8)]
    prompts = [TEMPLATE.format(prompt=f"{a}+{b}=", a=a + b, b=a + b + 1) for a, b in answers]
    continuations = greedy_completions(model, tokenizer, prompts, max_new_tokens=rlaif._REASONING_MAX_TOKENS)
    # The random model writes no ", so ": end its reasoning at two characters that some of
    # its continuations hold and some do not.
    candidates = {c[i : i + 2] for c in continuations for i in range(len(c) - 1)}
    end = max(
        (e for e in candidates if 0 < sum(e in c for c in continuations) < len(prompts)),
        key=lambda e: (sum(e in c for c in continuations), e),
    )
    monkeypatch.setattr(rlaif, "REASONING_END", end)
    reasoned, read = rlaif.reasoned_labels(model, tokenizer, prompts)
    ended = torch.tensor([end in c for c in continuations])
    assert torch.equal(~read.isnan(), ended)
    assert reasoned == [p + (c[: c.index(end)] if end in c else c) + end for p, c in zip(prompts, continuations)]
    forward = rlaif.label_probabilities(model, tokenizer, reasoned)
    torch.testing.assert_close(read[ended], forward[ended], atol=1e-5, rtol=0)
    swapped = [TEMPLATE.format(prompt=f"{a}+{b}=", a=a + b + 1, b=a + b) for a, b in answers]
    preference, shown_first, shown_second = rlaif.judge_preferences(
        model, tokenizer, TEMPLATE, [f"{a}+{b}=" for a, b in answers], [str(a + b) for a, b in answers],
        [str(a + b + 1) for a, b in answers], reasoning=True,
    )
    torch.testing.assert_close(shown_first, forward, atol=1e-5, rtol=0)
    swapped_reasoned, _ = rlaif.reasoned_labels(model, tokenizer, swapped)
    torch.testing.assert_close(
        shown_second, 1 - rlaif.label_probabilities(model, tokenizer, swapped_reasoned), atol=1e-5, rtol=0
    )
    assert not preference.isnan().any()


def test_judgement_rows_show_both_orders_with_the_reasoning_before_the_label():
    pair = {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
    assert rlaif.judgement_rows([pair], TEMPLATE, reasoning=True) == [
        {"prompt": "Q: 12+34=? A: 46 B: 47. Better:", "completion": " 12+34=46, A: 46, so A"},
        {"prompt": "Q: 12+34=? A: 47 B: 46. Better:", "completion": " 12+34=46, A: 47, so B"},
    ]
    assert [row["completion"] for row in rlaif.judgement_rows([pair], TEMPLATE)] == ["A", "B"]


def test_a_pair_of_two_wrong_answers_is_labelled_b_in_both_orders():
    ranking = {"prompt": "12+34=", "responses": ["46", "47", "44", "40"]}
    assert rlaif.neither_rows([ranking], TEMPLATE) == [
        {"prompt": "Q: 12+34=? A: 47 B: 44. Better:", "completion": " 12+34=46, A: 47, so B"},
        {"prompt": "Q: 12+34=? A: 44 B: 47. Better:", "completion": " 12+34=46, A: 44, so B"},
    ]


def test_each_prompt_trains_its_best_scoring_response_against_its_worst(monkeypatch):
    # The stand-in judge prefers the larger number, p = sigmoid(x - y), except on a
    # rock-paper-scissors prompt, where each response beats the next with 0.9.
    cycle = {("r", "p"): 0.1, ("p", "s"): 0.1, ("r", "s"): 0.9}
    shown = []

    def preferences(judge, tokenizer, template, prompts, first, second, reasoning=False):
        shown.extend(zip(prompts, first, second))
        p = [cycle[x, y] if prompt == "rps" else 1 / (1 + math.exp(int(y) - int(x)))
             for prompt, x, y in zip(prompts, first, second)]
        return torch.tensor(p, dtype=torch.float64), None, None

    monkeypatch.setattr(rlaif, "judge_preferences", preferences)
    prompts = ["ordered", "same", "rps", "two"]
    responses = [["3", "1", "3", "7"], ["5", "5", "5", "5"], ["r", "p", "s", "r"], ["4", "2", "4", "4"]]
    labelled = rlaif._label_best_and_worst(None, None, RLAIFConfig(samples_per_prompt=4), prompts, responses)
    # Every two distinct responses of a prompt are compared once; identical ones never.
    assert shown == [("ordered", "3", "1"), ("ordered", "3", "7"), ("ordered", "1", "7"),
                     ("rps", "r", "p"), ("rps", "r", "s"), ("rps", "p", "s"), ("two", "4", "2")]
    # "rps": every response wins 1.0 in all, a tie: no pair.
    assert labelled == [
        {"prompt": "ordered", "chosen": "7", "rejected": "1", "judge_probability": pytest.approx(1 / (1 + math.exp(-6)))},
        {"prompt": "two", "chosen": "4", "rejected": "2", "judge_probability": pytest.approx(1 / (1 + math.exp(-2)))},
    ]


@pytest.mark.parametrize("options, reasoning", [
    ({}, True), ({"judge": "some/judge"}, False), ({"judge_reasoning": False}, False),
    ({"judge": "some/judge", "judge_reasoning": True}, True),
])
def test_the_built_in_judge_reasons_and_a_given_one_reads_its_label_directly(options, reasoning):
    assert rlaif.judge_reasoning(RLAIFConfig(**options)) is reasoning


def test_a_built_in_judge_reused_by_path_keeps_its_reasoning(tmp_path):
    config = RLAIFConfig(judge_steps=2, max_length=64, output_dir=str(tmp_path / "run"))
    model_dir = rlaif.builtin_judge(config, tmp_path / "run")
    assert json.loads((model_dir / rlaif.JUDGE_CARD).read_text())["reasoning"] is True
    assert rlaif.judge_reasoning(RLAIFConfig(judge=str(model_dir))) is True
    assert rlaif.judge_reasoning(RLAIFConfig(judge=str(model_dir), judge_reasoning=False)) is False
    # a judge trained to answer directly says so, and its reuse reads the label directly
    direct = RLAIFConfig(judge_steps=2, max_length=64, judge_reasoning=False, output_dir=str(tmp_path / "direct"))
    direct_dir = rlaif.builtin_judge(direct, tmp_path / "direct")
    assert rlaif.judge_reasoning(RLAIFConfig(judge=str(direct_dir))) is False
    assert rlaif.builtin_judge(config, tmp_path / "run") == model_dir  # reused: the same checkpoint


def test_the_built_in_judge_is_cached_for_every_output_folder(tmp_path, capsys):
    config = RLAIFConfig(judge_steps=2, max_length=64, output_dir=str(tmp_path / "run"))
    model_dir = rlaif.builtin_judge(config, tmp_path / "run")
    assert model_dir.is_relative_to(warm_start.cache_root() / rlaif.JUDGE_DIR)
    assert (tmp_path / "run" / rlaif.JUDGE_DIR).resolve() == model_dir.parents[2].resolve()
    capsys.readouterr()
    # another output folder and seed: the same judge, not trained again, and a link to it
    other = dataclasses.replace(config, output_dir=str(tmp_path / "other"), seed=3)
    assert rlaif.builtin_judge(other, tmp_path / "other") == model_dir
    assert "reusing the judge" in capsys.readouterr().err
    assert (tmp_path / "other" / rlaif.JUDGE_DIR).resolve() == model_dir.parents[2].resolve()
    # a setting of the judge's training or rows changed: another entry
    longer = dataclasses.replace(config, judge_steps=3)
    assert rlaif.builtin_judge(longer, tmp_path / "run").parents[2] != model_dir.parents[2]
    # an entry whose checkpoint is gone is trained again in place
    shutil.rmtree(model_dir.parents[1])
    assert rlaif.builtin_judge(config, tmp_path / "run") == model_dir and model_dir.is_dir()


def _judge_folder(tmp_path):
    judge, tokenizer = load_causal_lm("builtin:tiny", seed=1)
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    return tmp_path / "judge"


def _eval_pairs(tmp_path):
    path = tmp_path / "eval_pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in AdditionTask().preference_pairs(8, "heldout")))
    return str(path)


def test_labelled_pairs_round_trip_through_dpo(tmp_path):
    judge_dir = _judge_folder(tmp_path)
    result = train("rlaif", {**QUICK, "judge": str(judge_dir), "then": "dpo", "eval_data": _eval_pairs(tmp_path),
                             "output_dir": str(tmp_path / "run")})
    schema, rows = load_dataset(tmp_path / "run" / rlaif.PAIRS_FILE, "dpo")
    assert schema == "pairwise" and len(rows) == result["labelled_pairs"] > 0
    assert result["labelled_pairs"] + result["identical_pairs"] <= QUICK["num_prompts"]
    assert 0 <= result["judge_heldout_accuracy"] <= 1
    # 16 prompts x samples_per_prompt samples of at most 4 tokens, and dpo decodes nothing more.
    samples = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["samples_per_prompt"]
    assert 0 < result["generated_tokens"] == result["labelling_generated_tokens"] <= 16 * samples * 4
    # Every label is the judge's debiased preference, whatever order the responses were sampled in.
    judge, tokenizer = load_causal_lm(str(judge_dir))
    preference, _, _ = rlaif.judge_preferences(
        judge, tokenizer, TEMPLATE, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
    )
    assert (preference > 0.5).all() and all(r["chosen"] != r["rejected"] for r in rows)
    torch.testing.assert_close(preference, torch.tensor([r["judge_probability"] for r in rows]))
    # dpo trained on them from the sampling policy.
    assert result["algorithm"] == "rlaif" and result["steps"] == 2 and math.isfinite(result["loss"])
    assert result["run_dir"] == str(tmp_path / "run" / "dpo")
    dpo_config = yaml.safe_load((tmp_path / "run" / "dpo" / "config.yaml").read_text())
    assert dpo_config["data"] == str(tmp_path / "run" / rlaif.PAIRS_FILE)
    assert dpo_config["model"] == str(tmp_path / "run" / "policy") and dpo_config["beta"] == 0.1
    assert dpo_config["learning_rate"] == 2e-4  # rlaif's default for its dpo stage, not dpo's 1e-4


def test_the_judged_samples_are_the_seeds_whatever_ran_before(tmp_path):
    judge_dir = str(_judge_folder(tmp_path))
    pairs = []
    for before, (run, seed) in enumerate((("a", 0), ("b", 0), ("c", 1))):
        torch.manual_seed(before)  # what ran before in the process left the global RNG anywhere
        train("rlaif", {**QUICK, "judge": judge_dir, "seed": seed, "output_dir": str(tmp_path / run)})
        pairs.append((tmp_path / run / rlaif.PAIRS_FILE).read_text())
    assert pairs[0] == pairs[1] != pairs[2]


def test_pairs_below_judge_confidence_do_not_train(tmp_path, monkeypatch):
    # A stand-in for the judge's debiased preferences, cycling over values on both sides of 0.5.
    cycle = [0.05, 0.3, 0.5, 0.65, 0.95]  # chosen probability 0.95, 0.7, a tie, 0.65, 0.95
    shown = []

    def preferences(judge, tokenizer, template, prompts, first, second, reasoning=False):
        shown.append((prompts, first, second))
        p = torch.tensor([cycle[i % len(cycle)] for i in range(len(prompts))])
        return p, p, p

    monkeypatch.setattr(rlaif, "judge_preferences", preferences)
    result = train("rlaif", {**QUICK, "judge": str(_judge_folder(tmp_path)), "then": "dpo", "judge_confidence": 0.68,
                             "samples_per_prompt": 2,
                             "eval_data": _eval_pairs(tmp_path), "output_dir": str(tmp_path / "run")})
    prompts, first, second = shown[0]  # the policy's samples (then the judge's own evaluation)
    expected, unconfident = [], 0
    for i, (prompt, x, y) in enumerate(zip(prompts, first, second)):
        p = cycle[i % len(cycle)]
        if x == y or p == 0.5:
            continue
        if max(p, 1 - p) < 0.68:
            unconfident += 1
            continue
        chosen, rejected = (x, y) if p > 0.5 else (y, x)
        expected.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "judge_probability": pytest.approx(max(p, 1 - p))})
    rows = [json.loads(line) for line in (tmp_path / "run" / rlaif.PAIRS_FILE).read_text().splitlines()]
    assert rows == expected and unconfident > 0
    assert result["labelled_pairs"] == len(expected) and result["unconfident_pairs"] == unconfident


def test_reward_then_ppo_trains_on_the_labelled_pairs(tmp_path):
    result = train("rlaif", {**QUICK, "judge": str(_judge_folder(tmp_path)), "then": "reward+ppo", "reward_steps": 2,
                             "output_dir": str(tmp_path / "run")})
    assert result["run_dir"] == str(tmp_path / "run" / "ppo") and result["steps"] == 2
    assert "reward_model_preference_accuracy_after" in result
    ppo_config = yaml.safe_load((tmp_path / "run" / "ppo" / "config.yaml").read_text())
    # The labelled samples' tokens, then the ppo stage's: every completion of each rollout it
    # sampled (1 to max_new_tokens=4 tokens each), trained on or not when the run ends.
    steps_per_pass = ppo_config["prompts_per_rollout"] // (ppo_config["batch_size"] * ppo_config["grad_accum_steps"])
    rollouts = math.ceil(2 / (steps_per_pass * ppo_config["num_iterations"]))
    completions = rollouts * ppo_config["prompts_per_rollout"]
    ppo_tokens = result["generated_tokens"] - result["labelling_generated_tokens"]
    assert result["labelling_generated_tokens"] > 0 and completions <= ppo_tokens <= 4 * completions
    reward_config = yaml.safe_load((tmp_path / "run" / "reward" / "config.yaml").read_text())
    assert reward_config["learning_rate"] == 1e-3 and reward_config["steps"] == 2  # reward_learning_rate, reward_steps
    assert ppo_config["rewards"] == [str(tmp_path / "run" / "reward" / "checkpoints" / "step-00000002" / "model")]


@pytest.mark.parametrize("override, message", [
    ({"judge_template": "Q: {prompt} A: {a}. Better:"}, "option 'judge_template'.*lacks {b}"),
    ({"data": "prompts.jsonl"}, "option 'judge': none trains the built-in judge"),
    ({"judge_confidence": 0.4}, r"option 'judge_confidence': got 0.4; expected a value in \[0.5, 1\)"),
])
def test_bad_options_name_the_option_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train("rlaif", {**QUICK, **override, "output_dir": str(tmp_path)})


def _right_judge(tmp_path, monkeypatch):
    """The verifier behind the judge's interface: every pair with one right answer
    labelled right, with probability 1 - e^-10; two wrong answers tie and drop out. The
    folder it stands for, to pass as ``judge``."""
    tokenizer = build_char_tokenizer()
    judge_dir = _judge_folder(tmp_path)
    real_load = rlaif.load_causal_lm
    monkeypatch.setattr(rlaif, "load_causal_lm", lambda name, **kw: (
        (_PositionBiasedJudge(tokenizer, bias=0.0, scale=10.0), tokenizer) if name == str(judge_dir)
        else real_load(name, **kw)
    ))
    return judge_dir


@pytest.mark.slow
def test_dpo_on_a_right_judges_labels_raises_heldout_accuracy_by_12_points(tmp_path, monkeypatch):
    # What is measured is then=dpo on the policy's own samples after the default warm
    # start, with rlaif's defaults on 256 prompts and 50 steps: 0.41 -> 0.605 (seed 0). With two
    # samples per prompt at dpo's own learning rate the same judge gave 0.575; without
    # rpo_alpha 0.17. What the built-in judge adds (its labels on two wrong answers) needs
    # its 2,500 training steps, measured in docs/online-rl.md, not here.
    judge_dir = _right_judge(tmp_path, monkeypatch)
    result = train("rlaif", {"then": "dpo", "judge": str(judge_dir), "judge_reasoning": False,
                             **RIGHT_JUDGE_DPO, "output_dir": str(tmp_path / "run")})
    assert result["judge_agreement"] == 1.0 and result["labelled_pairs"] > 100
    # The verifier is right on every held-out near miss and ties every pair of two of them.
    assert result["judge_heldout_accuracy"] == 1.0 and result["judge_heldout_two_wrong_confident"] == 0.0
    assert result["heldout_accuracy_after"] >= result["heldout_accuracy_before"] + 0.12


@pytest.mark.slow
def test_reward_then_ppo_on_a_right_judges_labels_raises_heldout_accuracy_by_5_points(tmp_path, monkeypatch):
    # then=reward+ppo, the default, at a CI budget: RIGHT_JUDGE_REWARD_PPO's comment.
    judge_dir = _right_judge(tmp_path, monkeypatch)
    result = train("rlaif", {"judge": str(judge_dir), "judge_reasoning": False, **RIGHT_JUDGE_REWARD_PPO,
                             "output_dir": str(tmp_path / "run")})
    assert result["run_dir"] == str(tmp_path / "run" / "ppo") and result["labelled_pairs"] > 400
    assert result["reward_model_preference_accuracy_after"] > result["reward_model_preference_accuracy_before"]
    assert result["heldout_accuracy_after"] >= result["heldout_accuracy_before"] + 0.05
