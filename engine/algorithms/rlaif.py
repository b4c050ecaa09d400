"""RL from AI feedback: a judge model labels pairs of the policy's own samples, and the
labelled pairs train the policy.

1. Policy: ``model``, warm-started as every algorithm is (``warm_start_steps``).
2. Judge: ``judge``, a local causal LM checkpoint folder; or, when none, on
   ``builtin:addition`` a ``builtin:tiny`` judge trained by fastpo's ``sft`` on the task's
   own judgement rows: every preference pair of the task's train split shown in both
   orders, ``judge_template`` filled with the problem and the two answers (``"Q:
   12+34=? A: 47 B: 46. Better:"``), the completion a reasoning and the label of the
   correct answer: ``" 12+34=46, A: 47, so B"`` (``judge_reasoning``, true by default
   for the built-in judge; without it the label alone). The reasoning solves the
   problem, which the judge learns from dense digit supervision (the task's addition
   demonstrations are mixed into its rows), and copies answer A next to the sum, so
   that the label is a comparison of two adjacent numbers: A when they are equal, B
   otherwise. One label per row from a random init is too little signal to learn
   addition from: such a judge stays at chance on near misses, and so does a reasoning
   judge without the demonstrations. A reasoning judge also sees pairs of two wrong
   answers, labelled by the same rule (B in both orders, so their debiased preference is
   0.5, below ``judge_confidence``): a judge that only ever saw one right answer among
   the two copies one of them as its sum, and then confidently prefers a wrong answer.
   It stands for a given labeller, so it does not depend on the run's seed (it is
   trained with seed 0): it is cached in ``cache_root()/judge`` (beside the warm starts)
   and reused, by every seed and output folder, while its config and rows are unchanged;
   ``output_dir/judge`` links to it.
3. Labels: ``samples_per_prompt`` responses sampled from the policy (``temperature``,
   ``max_new_tokens``, the global RNG seeded with the run's seed) for each of
   ``num_prompts`` prompts (4096 for reward+ppo, 1024 for dpo, if none). The judge's
   preference for a shown order is its next-token distribution restricted to the two
   labels (``softmax`` of their two logits), read
   right after the judge prompt, or with ``judge_reasoning`` after the judge's own greedy
   reasoning for that order (up to its first ``", so "``), from the logits of the decoding
   step that follows it (``reasoned_labels``). Response ``x`` beats ``y``
   with probability ``p = 0.5 * (P("A" | x shown as A) + P("B" | x shown as B))``:
   averaging both presentation orders cancels the judge's position bias, and ``p(x, y) =
   1 - p(y, x)`` exactly, so the label does not depend on which response was sampled
   first. The judge compares every two distinct responses of a prompt; each response
   scores the sum of its ``p``, and the best-scoring one is paired with the
   worst-scoring one, ``chosen`` the one the judge prefers of the two (with two
   responses: the pair's own label). Prompts whose responses are all identical, or all
   score the same, and exact ties are dropped, and so are the pairs whose ``max(p, 1 -
   p)`` is below ``judge_confidence``. The pairs kept are written to
   ``output_dir/pairs.jsonl`` (``prompt``, ``chosen``, ``rejected``, and
   ``judge_probability``, the ``p`` of the chosen response).
4. Training, from the sampling policy (saved as ``output_dir/policy``), with this
   config's loop options (``steps``, ``batch_size``, ``learning_rate``: none takes rlaif's
   default for the stage, below, else the stage's own; ``eval_data`` is the stage's
   held-out data: pairs for dpo, prompts for ppo):
   ``then=reward+ppo`` (the default, RLAIF's pipeline): ``fastpo reward`` on the pairs
   (``reward_steps`` steps at ``reward_learning_rate`` from the policy's backbone, its own
   defaults otherwise) in ``output_dir/reward``, then ``fastpo ppo`` on the prompts of
   ``data`` with that reward model as its reward and ``beta`` its KL coefficient, 2 if none
   (the reward of a completion is ``r_AI - beta * sum_t log(pi/pi_ref)``, RLAIF's
   objective), 300 steps at 5e-5 if none, in ``output_dir/ppo``; it stops after the reward
   stage when that was interrupted;
   ``then=dpo``: ``fastpo dpo`` on the pairs (``beta`` its beta, 0.1 if none,
   ``rpo_alpha`` its NLL term on the chosen response, ``learning_rate`` 2e-4 if none), in
   ``output_dir/dpo``.

The result is the training stage's (its folder is the ``run_dir`` reported, where
``metrics.jsonl`` and the checkpoints are), plus ``labelled_pairs`` (the pairs kept),
``unconfident_pairs`` (those dropped by ``judge_confidence``), ``identical_pairs`` (the
prompts whose sampled responses were all the same) and, on the built-in task,
``judge_heldout_accuracy``: the share of the task's held-out preference pairs (the
correct answer and a near miss, 1 to 20 away) whose debiased label is the correct answer;
``judge_heldout_two_wrong_confident``: the share of held-out pairs of two near misses
that the judge labels at or above ``judge_confidence`` (such pairs teach nothing right);
``judge_agreement``: among the labelled pairs with exactly one correct response, the
share whose chosen response is the correct one; and ``trained_pairs_agreement``, the
same among the pairs kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

from ..config import BaseConfig, DPOConfig, PPOConfig, RewardConfig, RLAIFConfig, SFTConfig, cache_settings, load_config
from ..forward import encode_prompts, greedy_tokens
from ..loop import latest_checkpoint
from ..models import BUILTIN_MODELS, load_causal_lm
from ..rollout import sample_completions
from ..warm_start import cache_entry, device_type, exclusive, link_run
from ..task import AdditionTask
from ._common import BUILTIN_DATA, MAX_BUILTIN_ROWS, builtin_task, prepare_run, training_rows

__all__ = [
    "JUDGE_LABELS", "REASONING_END", "builtin_judge", "judge_preferences", "judge_reasoning", "judgement_rows",
    "label_probabilities", "neither_rows", "reasoned_labels", "run",
]

JUDGE_LABELS = ("A", "B")  # the label of the response shown first, and of the second
REASONING_END = ", so "  # ends a reasoning judge's reasoning; its label is read next
_REASONING_MAX_TOKENS = 32  # the built-in judge's longest reasoning, " 99+99=198, A: 198, so ", is 23
JUDGE_DIR = "judge"  # the built-in judges' cache folder (under cache_root()) and the run folder's link to one
# Written into the built-in judge's model folder: how it was trained to answer, so that
# reusing it by path (judge=PATH) reads its label where it was trained to give it.
JUDGE_CARD = "fastpo_judge.json"
PAIRS_FILE = "pairs.jsonl"
_JUDGE_BATCH = 64  # rows per SFT micro-batch of the built-in judge
# Tokens per judge forward when labelling: the rows of a batch are this over the longest
# row's tokens (the old 64 rows for judge prompts of 256 tokens, so no more memory there).
# On the built-in task's short prompts (about 40 tokens and a 32-token reasoning) that is
# about 230 rows, which on the CPU label 1024 pairs in both orders in 7.0-7.8 s against
# 8.7-10.6 s at 64 rows.
_JUDGE_FORWARD_TOKENS = 64 * 256
_JUDGE_HELDOUT_PAIRS = 200  # held-out pairs of the judge's evaluations
# The built-in judge stands for a given labeller, the same whatever the run's seed: the
# cached judge serves every seed.
_JUDGE_SEED = 0
_SAMPLE_BATCH = 64  # prompts per sampling call
_SCORE_TIE = 1e-6  # summed win probabilities closer than this are a tie (float rounding)
_STAGE_DEFAULTS = ("steps", "batch_size", "learning_rate")  # none in the config: the training stage's default
# rlaif's values of the options left none, per training stage (measured, docs/online-rl.md):
# beta, dpo's own and for ppo on a reward model of the judge's labels forty times ppo's
# (its own let it chase the reward model's errors); learning_rate and steps where they
# differ from the stage's own: dpo on the judge's pairs gained more at twice dpo's 1e-4,
# ppo gained +8.5 on the weakest seed at 1e-4 for 150 steps and +11 at 5e-5 for 300;
# num_prompts, more for a reward model than for dpo.
_DEFAULTS = {
    "dpo": {"beta": 0.1, "learning_rate": 2e-4, "num_prompts": 1024},
    "reward+ppo": {"beta": 2.0, "learning_rate": 5e-5, "steps": 300, "num_prompts": 4096},
}


def run(config: RLAIFConfig, warm_start=None) -> dict:
    run_dir, policy, tokenizer, device = prepare_run("rlaif", config, warm_start=warm_start)
    judge_dir = Path(config.judge) if config.judge is not None else builtin_judge(config, run_dir)
    judge, judge_tokenizer = load_causal_lm(str(judge_dir))
    judge = judge.to(device).eval()

    num_prompts = _option(config, "num_prompts")
    rows = (
        builtin_task(config).rows("prompt", num_prompts, "train")
        if config.data == BUILTIN_DATA
        else training_rows("rlaif", config, "prompt")[:num_prompts]
    )
    torch.manual_seed(config.seed)  # the samples are the seed's, whatever drew from the RNG before
    prompts, responses, labelling_tokens = _sample_responses(policy, tokenizer, rows, config)
    labelled = _label_best_and_worst(judge, judge_tokenizer, config, prompts, responses)
    if not labelled:
        raise ValueError("rlaif: the judge labelled no pair (every prompt's responses were identical or tied)")
    pairs = [pair for pair in labelled if pair["judge_probability"] >= config.judge_confidence]
    if not pairs:
        raise ValueError(
            f"rlaif: none of the {len(labelled)} labelled pairs reaches judge_confidence={config.judge_confidence} "
            "(the judge probability of the chosen response); lower it"
        )
    pairs_path = run_dir / PAIRS_FILE
    pairs_path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    labelling = {
        "labelled_pairs": len(pairs), "unconfident_pairs": len(labelled) - len(pairs),
        "identical_pairs": sum(len(set(sampled)) == 1 for sampled in responses),
        "labelling_generated_tokens": labelling_tokens,
    }
    if config.data == BUILTIN_DATA:
        labelling.update(_judge_heldout_metrics(judge, judge_tokenizer, config))
        for name, among in (("judge_agreement", labelled), ("trained_pairs_agreement", pairs)):
            agreement = _verifier_agreement(among)
            if agreement is not None:
                labelling[name] = agreement
    print(f"fastpo: rlaif: {labelling}; pairs in {pairs_path}", file=sys.stderr)

    policy_dir = run_dir / "policy"
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    del judge, policy
    outcome = _train(config, run_dir, policy_dir, pairs_path)
    # The policy's decoded tokens: the labelled samples, then the ppo stage's rollouts (dpo
    # decodes none); unknown when that stage resumed a checkpoint older than its count.
    stage_tokens = outcome["metrics"].get("generated_tokens", 0)
    outcome["metrics"].update(labelling)
    outcome["metrics"]["generated_tokens"] = None if stage_tokens is None else labelling_tokens + stage_tokens
    return outcome


def _option(config: RLAIFConfig, name: str):
    """``config``'s value of option ``name``, or when it is none rlaif's for the training
    stage (``_DEFAULTS``; none when rlaif has none)."""
    value = getattr(config, name)
    return value if value is not None else _DEFAULTS[config.then].get(name)


def judge_reasoning(config: RLAIFConfig) -> bool:
    """Whether the judge reasons before its label: ``judge_reasoning``, or when none
    true for the built-in judge, and for ``judge=PATH`` what the folder's JUDGE_CARD says
    (a built-in judge fastpo trained), else false."""
    if config.judge_reasoning is not None:
        return config.judge_reasoning
    if config.judge is None:
        return True
    card = Path(config.judge) / JUDGE_CARD
    return bool(json.loads(card.read_text())["reasoning"]) if card.is_file() else False


def _judge_heldout_metrics(judge, tokenizer, config: RLAIFConfig) -> dict:
    """``judge_heldout_accuracy``: the share of the built-in task's held-out preference
    pairs (the correct answer and a near miss) whose debiased judge label is the correct
    answer; ``judge_heldout_two_wrong_confident``: the share of held-out pairs of two
    near misses labelled at or above ``judge_confidence``."""
    task = builtin_task(config)
    pairs = task.preference_pairs(_JUDGE_HELDOUT_PAIRS, "heldout")
    rankings = task.rankings(_JUDGE_HELDOUT_PAIRS, 3, "heldout")  # the correct answer, then two near misses
    preference, _, _ = judge_preferences(
        judge, tokenizer, config.judge_template,
        [p["prompt"] for p in pairs] + [r["prompt"] for r in rankings],
        [p["chosen"] for p in pairs] + [r["responses"][1] for r in rankings],
        [p["rejected"] for p in pairs] + [r["responses"][2] for r in rankings], judge_reasoning(config),
    )
    right, two_wrong = preference[: len(pairs)], preference[len(pairs) :]
    return {
        "judge_heldout_accuracy": float((right > 0.5).float().mean()),
        "judge_heldout_two_wrong_confident": float(
            (torch.maximum(two_wrong, 1 - two_wrong) >= config.judge_confidence).float().mean()
        ),
    }


def _train(config: RLAIFConfig, run_dir: Path, policy_dir: Path, pairs_path: Path) -> dict:
    """The training stage on the labelled pairs: the stage's ``run`` result."""
    from . import dpo, ppo, reward

    # The loop options of this config are the training stage's (those left none: rlaif's
    # value, else the stage's default); it starts from the saved policy.
    shared = {f.name: _option(config, f.name) for f in dataclasses.fields(BaseConfig)}
    shared = {name: value for name, value in shared.items() if not (name in _STAGE_DEFAULTS and value is None)}
    shared.update(model=str(policy_dir), warm_start_steps=0)
    beta = _option(config, "beta")
    if config.then == "dpo":
        return dpo.run(DPOConfig(
            **{**shared, "data": str(pairs_path), "output_dir": str(run_dir / "dpo")}, beta=beta,
            rpo_alpha=config.rpo_alpha,
        ))
    reward_options = {} if config.batch_size is None else {"batch_size": config.batch_size}
    reward_config = RewardConfig(
        model=str(policy_dir), data=str(pairs_path),
        output_dir=str(run_dir / "reward"), warm_start_steps=0, steps=config.reward_steps,
        learning_rate=config.reward_learning_rate, eval_every=0,
        seed=config.seed, device=config.device, dtype=config.dtype, autocast=config.autocast,
        max_length=config.max_length, **reward_options,
    )
    reward_outcome = reward.run(reward_config)
    if reward_outcome["result"].interrupted:  # SIGINT/SIGTERM: stop here, not ppo on a half-trained reward
        return reward_outcome
    reward_dir = reward_outcome["result"].checkpoint / "model"
    outcome = ppo.run(PPOConfig(
        **{**shared, "output_dir": str(run_dir / "ppo")}, rewards=[str(reward_dir)], beta=beta,
        temperature=config.temperature, max_new_tokens=config.max_new_tokens,
    ))
    outcome["metrics"].update({f"reward_model_{k}": v for k, v in reward_outcome["metrics"].items()})
    return outcome


def _sample_responses(policy, tokenizer, rows: list[dict], config) -> tuple[list[str], list[list[str]], int]:
    """``(prompts, responses, decoded tokens)``: ``samples_per_prompt`` sampled responses
    per row's prompt, and the tokens decoded for them."""
    prompts, responses, decoded = [], [], 0
    k = config.samples_per_prompt
    for start in range(0, len(rows), _SAMPLE_BATCH):
        batch = [row["prompt"] for row in rows[start : start + _SAMPLE_BATCH]]
        rollout = sample_completions(
            policy, tokenizer, [p for p in batch for _ in range(k)], temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
        )
        prompts += batch
        responses += [rollout.completions[i : i + k] for i in range(0, len(rollout.completions), k)]
        decoded += int(rollout.mask.sum())
    return prompts, responses, decoded


def _label_best_and_worst(judge, tokenizer, config, prompts: list[str], responses: list[list[str]]) -> list[dict]:
    """One labelled pair per prompt with two distinct responses: the judge compares every
    two distinct responses of the prompt (both orders, ``judge_preferences``), each
    response scores the sum of its win probabilities, and the best-scoring response is
    paired with the worst-scoring one (the first on ties), ordered by the judge's own
    preference between the two; prompts whose responses all score the same, and exact
    ties between the two, are dropped. With two responses per prompt this is the judge's
    label of the pair."""
    distinct = [list(dict.fromkeys(sampled)) for sampled in responses]
    matches = [  # (prompt index, i, j): response i shown first against response j
        (n, i, j) for n, sampled in enumerate(distinct) for i in range(len(sampled)) for j in range(i + 1, len(sampled))
    ]
    if not matches:
        return []
    preference, _, _ = judge_preferences(
        judge, tokenizer, config.judge_template, [prompts[n] for n, _, _ in matches],
        [distinct[n][i] for n, i, _ in matches], [distinct[n][j] for n, _, j in matches], judge_reasoning(config),
    )
    beats = {}  # (prompt index, i, j) -> the probability that response i beats response j
    for (n, i, j), p in zip(matches, preference.tolist()):
        beats[n, i, j], beats[n, j, i] = p, 1 - p
    labelled = []
    for n, sampled in enumerate(distinct):
        if len(sampled) < 2:
            continue
        scores = [sum(beats[n, i, j] for j in range(len(sampled)) if j != i) for i in range(len(sampled))]
        if max(scores) - min(scores) < _SCORE_TIE:  # every response scored the same
            continue
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        p = beats[n, best, worst]
        if p == 0.5:
            continue
        chosen, rejected = (best, worst) if p > 0.5 else (worst, best)
        labelled.append({
            "prompt": prompts[n], "chosen": sampled[chosen], "rejected": sampled[rejected],
            "judge_probability": max(p, 1 - p),
        })
    return labelled


def _verifier_agreement(pairs: list[dict]) -> float | None:
    """Among ``pairs`` with exactly one correct response, the share whose chosen one is
    correct; None when there is no such pair."""
    decided = [
        (AdditionTask.verify(pair["prompt"], pair["chosen"]), AdditionTask.verify(pair["prompt"], pair["rejected"]))
        for pair in pairs
    ]
    decided = [chosen for chosen, rejected in decided if chosen != rejected]
    return sum(decided) / len(decided) if decided else None


def _judge_rows_per_forward(longest: int) -> int:
    """Rows per judge forward when its longest row holds ``longest`` tokens."""
    return max(1, _JUDGE_FORWARD_TOKENS // max(1, longest))


class _LabelLogits:
    """A ``generate`` logits processor that keeps, at every step, the logits of the two
    labels (``(B, 2)`` float32), not the ``(B, V)`` ones: the label a reasoning judge
    writes after its reasoning is read from the step that writes it."""

    def __init__(self, label_ids: torch.Tensor):
        self.label_ids = label_ids
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores[:, self.label_ids.to(scores.device)].float().cpu())
        return scores


def _label_ids(tokenizer) -> torch.Tensor:
    label_ids = [tokenizer.encode(label, add_special_tokens=False) for label in JUDGE_LABELS]
    if any(len(ids) != 1 for ids in label_ids):
        raise ValueError(f"the judge's tokenizer must encode each of {JUDGE_LABELS} as one token, got {label_ids}")
    return torch.tensor([ids[0] for ids in label_ids])


def reasoned_labels(judge, tokenizer, texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """``(reasoned, p)``: each judge prompt followed by the judge's reasoning, its greedy
    continuation (at most ``_REASONING_MAX_TOKENS`` tokens) cut just after the first
    ``REASONING_END`` (a continuation without one is kept whole and ``REASONING_END``
    appended, so the label is always read at the same place); and ``(n,)`` float32, the
    probability of ``"A"`` over ``"B"`` after it, as ``label_probabilities`` of
    ``reasoned`` reads it, taken from the decoding step that follows the reasoning (one
    step past the reasoning's budget is decoded for it) instead of a second forward over
    prompt and reasoning: on the built-in task that forward was 40% of the labelling.
    (A ``judge=PATH`` whose generation config sets logits processors, a repetition
    penalty say, is read after them: the logits its reasoning was decoded from.) NaN
    where the decoding did not reach that place: a reasoning cut at the budget, or one
    whose text does not encode back to the tokens decoded (a tokenizer that merges
    across the prompt's end); ``label_probabilities`` reads those."""
    from transformers import LogitsProcessorList

    label_ids = _label_ids(tokenizer)
    encoded = encode_prompts(tokenizer, texts)
    rows = _judge_rows_per_forward(max((len(ids) for ids in encoded), default=0) + _REASONING_MAX_TOKENS + 1)
    reasoned, probabilities = [], torch.full((len(texts),), float("nan"))
    for start in range(0, len(texts), rows):
        batch = encoded[start : start + rows]
        recorder = _LabelLogits(label_ids)
        continuations = greedy_tokens(
            judge, tokenizer, batch, _REASONING_MAX_TOKENS + 1, logits_processor=LogitsProcessorList([recorder])
        )
        for row, (prompt_ids, tokens) in enumerate(zip(batch, continuations.tolist())):
            index = start + row
            continuation = tokenizer.decode(tokens[:_REASONING_MAX_TOKENS], skip_special_tokens=True)
            end = continuation.find(REASONING_END)
            reasoning = continuation[:end] if end >= 0 else continuation
            reasoned.append(texts[index] + reasoning + REASONING_END)
            if end < 0:
                continue
            read = encode_prompts(tokenizer, [reasoned[-1]])[0]  # what label_probabilities would read
            written = read[len(prompt_ids) :]
            same = read[: len(prompt_ids)] == prompt_ids and tokens[: len(written)] == written
            if same and len(written) < len(recorder.steps):
                probabilities[index] = recorder.steps[len(written)][row].softmax(dim=-1)[0]
    return reasoned, probabilities


@torch.no_grad()
def label_probabilities(judge, tokenizer, texts: list[str]) -> torch.Tensor:
    """``(n,)`` float32: for each judge prompt, the judge's probability of ``"A"`` over
    ``"B"`` as the next token (``softmax`` of the two labels' logits), read at the
    prompt's last token (``[bos] text``, right-padded, as in training)."""
    label_ids = _label_ids(tokenizer)
    device = next(judge.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    every = [bos + tokenizer.encode(text, add_special_tokens=False) for text in texts]
    rows = _judge_rows_per_forward(max((len(ids) for ids in every), default=0))
    probabilities = []
    for start in range(0, len(every), rows):
        encoded = every[start : start + rows]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded], device=device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded], device=device)
        logits = judge(input_ids=input_ids, attention_mask=attention_mask).logits
        last = attention_mask.sum(dim=1) - 1
        pair = logits[torch.arange(len(encoded), device=device), last][:, label_ids.to(device)].float()
        probabilities.append(pair.softmax(dim=-1)[:, 0].cpu())
    return torch.cat(probabilities)


def judge_preferences(judge, tokenizer, template: str, prompts: list[str], first: list[str], second: list[str],
                      reasoning: bool = False):
    """``(p, first_shown_first, first_shown_second)``, each ``(n,)``: ``p`` the debiased
    probability that ``first`` beats ``second``, the mean of the two raw ones,
    ``first_shown_first = P("A")`` with ``first`` shown as A and ``first_shown_second =
    P("B")`` with ``first`` shown as B. With ``reasoning`` each order's label is read
    after the judge's own reasoning for that order (``reasoned_labels``), else right
    after the prompt."""

    def probabilities(texts):
        if not reasoning:
            return label_probabilities(judge, tokenizer, texts)
        reasoned, read = reasoned_labels(judge, tokenizer, texts)
        unread = read.isnan().nonzero().flatten().tolist()
        if unread:
            read[unread] = label_probabilities(judge, tokenizer, [reasoned[i] for i in unread])
        return read

    shown = list(zip(prompts, first, second))
    first_shown_first = probabilities([template.format(prompt=p, a=x, b=y) for p, x, y in shown])
    first_shown_second = 1 - probabilities([template.format(prompt=p, a=y, b=x) for p, x, y in shown])
    return 0.5 * (first_shown_first + first_shown_second), first_shown_first, first_shown_second


def judgement_rows(pairs: list[dict], template: str, reasoning: bool = False) -> list[dict]:
    """SFT rows ``{"prompt", "completion"}`` of a judge: each preference pair in both
    orders, the completion the label of the chosen response; with ``reasoning`` the
    label follows a reasoning: the pair's prompt and chosen response (the problem
    solved), then the response shown as A (``" 12+34=46, A: 47, so B"``)."""
    rows = []
    for pair in pairs:
        for a, b in ((pair["chosen"], pair["rejected"]), (pair["rejected"], pair["chosen"])):
            rows.append(_judgement_row(template, pair["prompt"], pair["chosen"], a, b, reasoning))
    return rows


def neither_rows(rankings: list[dict], template: str) -> list[dict]:
    """SFT rows of a reasoning judge on pairs of two wrong answers: the two worse
    responses of each ranking (the correct answer first) in both orders, labelled by the
    same rule as ``judgement_rows`` (A when answer A is the solved sum, else B), so B in
    both orders: the debiased preference of such a pair is 0.5, which ``judge_confidence``
    drops. Without them the judge only ever saw one right answer among the two, and on
    two wrong ones it copied one as its sum and preferred it confidently."""
    rows = []
    for ranking in rankings:
        answer, x, y = ranking["responses"][:3]
        for a, b in ((x, y), (y, x)):
            rows.append(_judgement_row(template, ranking["prompt"], answer, a, b, reasoning=True))
    return rows


def _judgement_row(template: str, prompt: str, answer: str, a: str, b: str, reasoning: bool) -> dict:
    label = JUDGE_LABELS[0] if a == answer else JUDGE_LABELS[1]
    reasoned = f" {prompt}{answer}, {JUDGE_LABELS[0]}: {a}{REASONING_END}" if reasoning else ""
    return {"prompt": template.format(prompt=prompt, a=a, b=b), "completion": reasoned + label}


def builtin_judge(config: RLAIFConfig, run_dir: Path) -> Path:
    """The model folder of the built-in judge: ``judge_steps`` SFT steps of
    ``builtin:tiny`` on the task's judgement rows (with reasoning when
    ``judge_reasoning(config)``), trained unless the cache holds one made with the same
    settings and rows: ``cache_root()/judge/<key>`` (``fastpo.engine.warm_start``, as
    the warm starts), which every run and output folder reuses; ``run_dir/judge`` links
    to it.

    A reasoning judge also trains on the task's addition demonstrations (``"12+34="`` ->
    ``"46"``), as many as the pairs: without them its reasoning's sum stayed about half
    right after 1,000 steps, and its labels at chance; and on half as many pairs of two
    wrong answers (``neither_rows``), which it needs more steps to learn from (0.69 on
    held-out near misses after 1,500 steps, 0.98 after 2,500)."""
    from . import sft

    task = builtin_task(dataclasses.replace(config, seed=_JUDGE_SEED))
    reasoning = judge_reasoning(config)
    pairs = min(config.judge_steps * _JUDGE_BATCH // 2, MAX_BUILTIN_ROWS)
    rows = judgement_rows(task.preference_pairs(pairs, "train"), config.judge_template, reasoning)
    if reasoning:
        rows += neither_rows(task.rankings(pairs // 2, 3, "train"), config.judge_template)
        rows += task.sft_examples(pairs, "train")
    files = {
        "judgements.jsonl": rows,
        "judgements_heldout.jsonl": judgement_rows(
            task.preference_pairs(_JUDGE_HELDOUT_PAIRS, "heldout"), config.judge_template, reasoning
        ),
    }
    texts = {name: "".join(json.dumps(row) + "\n" for row in rows) for name, rows in files.items()}

    def sft_config(folder: Path) -> SFTConfig:
        return SFTConfig(
            model=BUILTIN_MODELS[0], data=str(folder / "judgements.jsonl"),
            eval_data=str(folder / "judgements_heldout.jsonl"), seed=_JUDGE_SEED, device=config.device,
            dtype=config.dtype, max_length=config.max_length, steps=config.judge_steps, batch_size=_JUDGE_BATCH,
            learning_rate=2e-3, warmup_steps=20, eval_every=0, packing=True, output_dir=str(folder),
        )

    settings = cache_settings(sft_config(Path(".")))
    for name in ("output_dir", "data", "eval_data", "device"):
        settings.pop(name)
    folder = cache_entry(JUDGE_DIR, {
        "device_type": device_type(config.device), "reasoning": reasoning, **settings,
        "rows": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()},
    })
    with exclusive(folder):
        checkpoint = latest_checkpoint(folder)
        cached = (  # the key's settings in full against what the entry holds, on any device of its type
            checkpoint is not None
            and checkpoint.name == f"step-{config.judge_steps:08d}"
            and dataclasses.replace(load_config("sft", folder / "config.yaml"), device=config.device)
            == sft_config(folder)
            and all((folder / name).is_file() and (folder / name).read_text() == text for name, text in texts.items())
        )
        if cached:
            print(f"fastpo: rlaif: reusing the judge {checkpoint}", file=sys.stderr)
            model_dir = checkpoint / "model"
        else:
            print(f"fastpo: rlaif: training the judge ({config.judge_steps} SFT steps), cached in {folder}",
                  file=sys.stderr)
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in texts.items():
                (folder / name).write_text(text)
            model_dir = sft.run(sft_config(folder))["result"].checkpoint / "model"
        (model_dir / JUDGE_CARD).write_text(json.dumps({"reasoning": reasoning}) + "\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    link_run(run_dir, folder, JUDGE_DIR)
    return model_dir
