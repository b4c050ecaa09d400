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
   judge without the demonstrations. It stands for a given labeller, so it does not
   depend on the run's seed (it is trained with seed 0): it is cached in
   ``output_dir/judge`` and reused, by every seed, while its config and rows are
   unchanged.
3. Labels: two responses sampled from the policy (``temperature``, ``max_new_tokens``)
   for each of ``num_prompts`` prompts. The judge's preference for a shown order is its
   next-token distribution restricted to the two labels (``softmax`` of their two
   logits), read right after the judge prompt, or with ``judge_reasoning`` after the
   judge's own greedy reasoning for that order (up to its first ``", so "``). Response
   ``x`` beats ``y`` with probability ``p = 0.5 * (P("A" | x shown as A) + P("B" | x
   shown as B))``: averaging both presentation orders cancels the judge's position
   bias, and ``p(x, y) = 1 - p(y, x)`` exactly, so the label does not depend on which
   response was sampled first. A pair is labelled ``chosen = x`` when ``p > 0.5`` and
   ``y`` when ``p < 0.5``; pairs of two identical responses, and exact ties, are
   dropped, and so are the pairs whose ``max(p, 1 - p)`` is below ``judge_confidence``
   (on the built-in task mostly pairs of two wrong answers, where the judge has no right
   answer to prefer). The pairs kept are written to ``output_dir/pairs.jsonl``
   (``prompt``, ``chosen``, ``rejected``, and ``judge_probability``, the ``p`` of the
   chosen response).
4. Training, from the sampling policy (saved as ``output_dir/policy``), with this
   config's loop options (``steps``, ``batch_size``, ``learning_rate``: none takes the
   stage's own default; ``eval_data`` is the stage's held-out data: pairs for dpo,
   prompts for ppo):
   ``then=dpo`` (the default): ``fastpo dpo`` on the pairs (``beta`` its beta, 0.1 if none,
   ``rpo_alpha`` its NLL term on the chosen response), in ``output_dir/dpo``;
   ``then=reward+ppo``: ``fastpo reward`` on the pairs (``reward_steps`` steps from the
   policy's backbone, its own defaults otherwise) in ``output_dir/reward``, then
   ``fastpo ppo`` on the prompts of ``data`` with that reward model as its reward and
   ``beta`` its KL coefficient, 0.5 if none (the reward of a completion is ``r_AI - beta * sum_t
   log(pi/pi_ref)``, RLAIF's objective) in ``output_dir/ppo``; it stops after the reward
   stage when that was interrupted.

The result is the training stage's (its folder is the ``run_dir`` reported, where
``metrics.jsonl`` and the checkpoints are), plus ``labelled_pairs`` (the pairs kept),
``unconfident_pairs`` (those dropped by ``judge_confidence``), ``identical_pairs``
and, on the built-in task, ``judge_heldout_accuracy``: the share of the task's held-out
preference pairs (the correct answer and a near miss, 1 to 20 away) whose debiased label
is the correct answer; ``judge_agreement``: among the labelled pairs with exactly one
correct response, the share whose chosen response is the correct one; and
``trained_pairs_agreement``, the same among the pairs kept.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..config import BaseConfig, DPOConfig, PPOConfig, RewardConfig, RLAIFConfig, SFTConfig, load_config
from ..forward import greedy_completions
from ..loop import latest_checkpoint
from ..models import BUILTIN_MODELS, load_causal_lm
from ..rollout import sample_completions
from ..task import AdditionTask
from ._common import BUILTIN_DATA, MAX_BUILTIN_ROWS, builtin_task, prepare_run, training_rows

__all__ = [
    "JUDGE_LABELS", "REASONING_END", "builtin_judge", "judge_preferences", "judge_reasoning", "judgement_rows",
    "label_probabilities", "reasoned_prompts", "run",
]

JUDGE_LABELS = ("A", "B")  # the label of the response shown first, and of the second
REASONING_END = ", so "  # ends a reasoning judge's reasoning; its label is read next
_REASONING_MAX_TOKENS = 32  # the built-in judge's longest reasoning, " 99+99=198, A: 198, so ", is 23
JUDGE_DIR = "judge"
# Written into the built-in judge's model folder: how it was trained to answer, so that
# reusing it by path (judge=PATH) reads its label where it was trained to give it.
JUDGE_CARD = "fastpo_judge.json"
PAIRS_FILE = "pairs.jsonl"
_JUDGE_BATCH = 64  # rows per SFT micro-batch of the built-in judge, and per judge forward
_JUDGE_HELDOUT_PAIRS = 200  # held-out pairs of the judge's evaluations
# The built-in judge stands for a given labeller, the same whatever the run's seed: a run
# folder's judge serves every seed.
_JUDGE_SEED = 0
_SAMPLE_BATCH = 64  # prompts per sampling call
_STAGE_DEFAULTS = ("steps", "batch_size", "learning_rate")  # none in the config: the training stage's default
# beta when none is given: dpo's own default, and for ppo on a reward model trained on the
# judge's labels a KL coefficient ten times ppo's (measured, docs/online-rl.md)
_DEFAULT_BETA = {"dpo": 0.1, "reward+ppo": 0.5}


def run(config: RLAIFConfig, warm_start=None) -> dict:
    run_dir, policy, tokenizer, device = prepare_run("rlaif", config, warm_start=warm_start)
    judge_dir = Path(config.judge) if config.judge is not None else builtin_judge(config, run_dir)
    judge, judge_tokenizer = load_causal_lm(str(judge_dir))
    judge = judge.to(device).eval()

    rows = (
        builtin_task(config).rows("prompt", config.num_prompts, "train")
        if config.data == BUILTIN_DATA
        else training_rows("rlaif", config, "prompt")[: config.num_prompts]
    )
    prompts, first, second = _sample_pairs(policy, tokenizer, rows, config)
    reasoning = judge_reasoning(config)
    preference, _, _ = judge_preferences(
        judge, judge_tokenizer, config.judge_template, prompts, first, second, reasoning
    )
    labelled = [
        {"prompt": p, "chosen": x if q > 0.5 else y, "rejected": y if q > 0.5 else x, "judge_probability": max(q, 1 - q)}
        for p, x, y, q in zip(prompts, first, second, preference.tolist())
        if x != y and q != 0.5
    ]
    if not labelled:
        raise ValueError("rlaif: the judge labelled no pair (every pair of responses was identical or a tie)")
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
        "identical_pairs": sum(x == y for x, y in zip(first, second)),
    }
    if config.data == BUILTIN_DATA:
        labelling["judge_heldout_accuracy"] = _judge_heldout_accuracy(judge, judge_tokenizer, config, reasoning)
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
    outcome["metrics"].update(labelling)
    return outcome


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


def _judge_heldout_accuracy(judge, tokenizer, config: RLAIFConfig, reasoning: bool) -> float:
    """The share of the built-in task's held-out preference pairs (the correct answer
    and a near miss) whose debiased judge label is the correct answer."""
    pairs = builtin_task(config).preference_pairs(_JUDGE_HELDOUT_PAIRS, "heldout")
    preference, _, _ = judge_preferences(
        judge, tokenizer, config.judge_template, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
        [p["rejected"] for p in pairs], reasoning,
    )
    return float((preference > 0.5).float().mean())


def _train(config: RLAIFConfig, run_dir: Path, policy_dir: Path, pairs_path: Path) -> dict:
    """The training stage on the labelled pairs: the stage's ``run`` result."""
    from . import dpo, ppo, reward

    # The loop options of this config are the training stage's (those left none: the stage's
    # defaults); it starts from the saved policy.
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(BaseConfig)}
    shared = {name: value for name, value in shared.items() if not (name in _STAGE_DEFAULTS and value is None)}
    shared.update(model=str(policy_dir), warm_start_steps=0)
    beta = config.beta if config.beta is not None else _DEFAULT_BETA[config.then]
    if config.then == "dpo":
        return dpo.run(DPOConfig(
            **{**shared, "data": str(pairs_path), "output_dir": str(run_dir / "dpo")}, beta=beta,
            rpo_alpha=config.rpo_alpha,
        ))
    reward_options = {} if config.batch_size is None else {"batch_size": config.batch_size}
    reward_config = RewardConfig(
        model=str(policy_dir), data=str(pairs_path),
        output_dir=str(run_dir / "reward"), warm_start_steps=0, steps=config.reward_steps, eval_every=0,
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


def _sample_pairs(policy, tokenizer, rows: list[dict], config) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, first, second)``: two sampled responses per row's prompt."""
    prompts, first, second = [], [], []
    for start in range(0, len(rows), _SAMPLE_BATCH):
        batch = [row["prompt"] for row in rows[start : start + _SAMPLE_BATCH]]
        rollout = sample_completions(
            policy, tokenizer, [p for p in batch for _ in range(2)], temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, max_length=config.max_length,
        )
        prompts += batch
        first += rollout.completions[0::2]
        second += rollout.completions[1::2]
    return prompts, first, second


def _verifier_agreement(pairs: list[dict]) -> float | None:
    """Among ``pairs`` with exactly one correct response, the share whose chosen one is
    correct; None when there is no such pair."""
    decided = [
        (AdditionTask.verify(pair["prompt"], pair["chosen"]), AdditionTask.verify(pair["prompt"], pair["rejected"]))
        for pair in pairs
    ]
    decided = [chosen for chosen, rejected in decided if chosen != rejected]
    return sum(decided) / len(decided) if decided else None


def reasoned_prompts(judge, tokenizer, texts: list[str]) -> list[str]:
    """Each judge prompt followed by the judge's reasoning: its greedy continuation (at
    most ``_REASONING_MAX_TOKENS`` tokens) cut just after the first ``REASONING_END``; a
    continuation without one is kept whole and ``REASONING_END`` appended, so the label
    is always read at the same place."""
    continuations = greedy_completions(judge, tokenizer, texts, max_new_tokens=_REASONING_MAX_TOKENS)
    reasoned = []
    for text, continuation in zip(texts, continuations):
        end = continuation.find(REASONING_END)
        reasoning = continuation[: end] if end >= 0 else continuation
        reasoned.append(text + reasoning + REASONING_END)
    return reasoned


@torch.no_grad()
def label_probabilities(judge, tokenizer, texts: list[str]) -> torch.Tensor:
    """``(n,)`` float32: for each judge prompt, the judge's probability of ``"A"`` over
    ``"B"`` as the next token (``softmax`` of the two labels' logits), read at the
    prompt's last token (``[bos] text``, right-padded, as in training)."""
    label_ids = [tokenizer.encode(label, add_special_tokens=False) for label in JUDGE_LABELS]
    if any(len(ids) != 1 for ids in label_ids):
        raise ValueError(f"the judge's tokenizer must encode each of {JUDGE_LABELS} as one token, got {label_ids}")
    label_ids = torch.tensor([ids[0] for ids in label_ids])
    device = next(judge.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probabilities = []
    for start in range(0, len(texts), _JUDGE_BATCH):
        encoded = [bos + tokenizer.encode(text, add_special_tokens=False) for text in texts[start : start + _JUDGE_BATCH]]
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
    after the judge's own reasoning for that order (``reasoned_prompts``), else right
    after the prompt."""

    def probabilities(texts):
        return label_probabilities(judge, tokenizer, reasoned_prompts(judge, tokenizer, texts) if reasoning else texts)

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
        for label, a, b in ((JUDGE_LABELS[0], pair["chosen"], pair["rejected"]),
                            (JUDGE_LABELS[1], pair["rejected"], pair["chosen"])):
            reasoned = f" {pair['prompt']}{pair['chosen']}, {JUDGE_LABELS[0]}: {a}{REASONING_END}" if reasoning else ""
            rows.append({"prompt": template.format(prompt=pair["prompt"], a=a, b=b), "completion": reasoned + label})
    return rows


def builtin_judge(config: RLAIFConfig, run_dir: Path) -> Path:
    """The model folder of the built-in judge: ``judge_steps`` SFT steps of
    ``builtin:tiny`` on the task's judgement rows (with reasoning when
    ``judge_reasoning(config)``), trained unless ``run_dir/judge`` already holds one made
    with the same settings and rows.

    A reasoning judge also trains on the task's addition demonstrations (``"12+34="`` ->
    ``"46"``), as many as the pairs: without them its reasoning's sum stayed about half
    right after 1,000 steps, and its labels at chance."""
    from . import sft

    folder = run_dir / JUDGE_DIR
    task = builtin_task(dataclasses.replace(config, seed=_JUDGE_SEED))
    reasoning = judge_reasoning(config)
    pairs = min(config.judge_steps * _JUDGE_BATCH // 2, MAX_BUILTIN_ROWS)
    rows = judgement_rows(task.preference_pairs(pairs, "train"), config.judge_template, reasoning)
    if reasoning:
        rows += task.sft_examples(pairs, "train")
    files = {
        folder / "judgements.jsonl": rows,
        folder / "judgements_heldout.jsonl": judgement_rows(
            task.preference_pairs(_JUDGE_HELDOUT_PAIRS, "heldout"), config.judge_template, reasoning
        ),
    }
    texts = {path: "".join(json.dumps(row) + "\n" for row in rows) for path, rows in files.items()}
    sft_config = SFTConfig(
        model=BUILTIN_MODELS[0], data=str(folder / "judgements.jsonl"), eval_data=str(folder / "judgements_heldout.jsonl"),
        seed=_JUDGE_SEED, device=config.device, dtype=config.dtype, max_length=config.max_length,
        steps=config.judge_steps, batch_size=_JUDGE_BATCH, learning_rate=2e-3, warmup_steps=20, eval_every=0,
        packing=True, output_dir=str(folder),
    )
    checkpoint = latest_checkpoint(folder)
    cached = (
        checkpoint is not None
        and checkpoint.name == f"step-{config.judge_steps:08d}"
        and load_config("sft", folder / "config.yaml") == sft_config
        and all(path.is_file() and path.read_text() == text for path, text in texts.items())
    )
    if cached:
        print(f"fastpo: rlaif: reusing the judge {checkpoint}", file=sys.stderr)
        model_dir = checkpoint / "model"
    else:
        print(f"fastpo: rlaif: training the judge ({config.judge_steps} SFT steps) in {folder}", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        for path, text in texts.items():
            path.write_text(text)
        model_dir = sft.run(sft_config)["result"].checkpoint / "model"
    (model_dir / JUDGE_CARD).write_text(json.dumps({"reasoning": reasoning}) + "\n")
    return model_dir
