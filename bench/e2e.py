"""End-to-end training steps: fastpo's engine against TRL's trainers, on the same model.

    python -m fastpo.bench --only e2e [--out DIR] [--reps N] [--threads N]
    python -m fastpo.bench.e2e [--out DIR] [--reps N] [--threads N]   # the same cases alone

Three cases, each a whole optimizer step of one trainer:

* ``grpo``, twice: rollout (sampling ``group`` completions of ``completion_len`` tokens
  for each of ``batch / group`` prompts), rewards and group advantages, the policy's
  log-probs, the clipped GRPO loss, backward, gradient clipping and the AdamW step;
  with ``beta = 0`` (no reference model) and with ``beta = 0.04`` (the k3 KL to a frozen
  reference, whose log-probs are computed on every rollout). fastpo: ``fastpo.engine.train("grpo", ...)``;
  TRL: ``GRPOTrainer`` (HF ``generate`` for its rollouts, like fastpo's engine).
* ``dpo``: ``batch`` preference pairs: the policy's log-probs of chosen and rejected
  responses, the sigmoid DPO loss against reference log-probs, backward, clipping and
  the AdamW step. fastpo's engine computes the frozen reference's log-probs once
  before training; TRL's ``DPOTrainer`` runs with ``precompute_ref_log_probs=True``
  so that it does the same (its default keeps a reference copy and runs it every step).

The model is a Qwen2 causal LM built in code (``Qwen2ForCausalLM``: hidden 256, 2
layers, 4 heads of which 2 key/value heads, MLP 1024, tied input/output embeddings) with
Qwen2's real vocabulary size, 151,936 tokens, so that the LM head and its logits are
full size. Its tokenizer is a real ``Qwen2Tokenizer`` (Qwen's pre-tokenizer, byte-level
BPE) of 151,936 entries, also built in code: ``<pad>``, ``<eos>``, ``<unk>``, the 256
byte symbols, and 151,677 merged tokens, a space followed by 1 to 4 lowercase letters
(``build_tokenizer``); no BOS. Both trainers load it with ``AutoTokenizer`` from the
same folder, so they see the same token ids. Prompts and responses are generated
words of that vocabulary, one token each: every prompt is ``prompt_len`` tokens, every
DPO response ``completion_len`` tokens with its EOS, and a GRPO completion is
``completion_len`` sampled tokens (the random model almost never samples EOS; the row's
note gives the measured mean).

TRL's trainers run twice: stock (``trl``) and with ``fastpo.integrations.trl.enable()``
(``trl+fastpo``): the same trainer, model, data and configuration, with TRL's fused LM
head computed by fastpo (docs/integrations.md). The fastpo row's note gives TRL's time
and memory over fastpo's engine, the ``trl+fastpo`` row's note stock TRL's over TRL with
fastpo.

With ``--quick`` (``python -m fastpo.bench --only e2e --quick``) the cases are
``QUICK_CASES``: the same model with a 4,096-token vocabulary, 8 prompt and 8
completion tokens and one timed step, a smoke run of every row in a few minutes.

Every side runs with the same configuration (``describe_fastpo`` and ``describe_trl``
read it back from each trainer's own config object, and a case whose two sides differ
is not timed): the batch, the group size, the prompt and completion lengths, learning
rate, beta, loss, temperature, gradient clipping, no weight decay, a constant learning
rate without warmup, fp32 without autocast, no gradient checkpointing, ``torch.optim.
AdamW``, the device.

Each (case, implementation) runs in its own fresh process that trains ``1 + reps``
steps. Time per step: the wall clock of each optimizer step after the first (warm-up)
one, from fetching its batch (for GRPO this is where the rollout happens) to after the
scheduler step: fastpo's own ``step_time_s`` of ``metrics.jsonl``, and for TRL the same
span timed by a callback (from ``get_batch_samples`` to ``on_step_end``); median and
20th/80th percentiles. Memory (``extra_mem_MiB``): the peak resident set of the process
through the last training step, minus its resident set once the libraries are
imported, before the model is loaded: model, optimizer state, data and the steps'
activations. Neither side writes a checkpoint (fastpo's end-of-run checkpoint is
skipped in the child; TRL runs with ``save_strategy="no"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fastpo.bench import harness

NAME = "e2e"
MODULE = "fastpo.bench.e2e"  # the children run `python -m MODULE --child JSON`
VOCAB = 151936  # Qwen2 / Qwen2.5
MODEL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
SPECIAL = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2
WARMUP_STEPS = 1
DEFAULT_REPS = 5
EVAL_ROWS = 2  # fastpo evaluates before and after training (outside the timed steps): keep it small


@dataclasses.dataclass(frozen=True)
class Case:
    """One end-to-end case. ``batch``: completions per optimizer step (grpo) or
    preference pairs per step (dpo); ``group``: completions per prompt (grpo only)."""

    algorithm: str
    batch: int
    prompt_len: int
    completion_len: int
    learning_rate: float
    beta: float
    group: int | None = None
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    vocab_size: int = VOCAB

    @property
    def prompts_per_step(self) -> int:
        return self.batch // self.group if self.group else self.batch

    @property
    def tokens(self) -> int:
        """Tokens per step: sequences x (prompt + completion); a pair is two sequences."""
        sequences = self.batch if self.algorithm == "grpo" else 2 * self.batch
        return sequences * (self.prompt_len + self.completion_len)


CASES = (
    Case("grpo", batch=8, group=4, prompt_len=32, completion_len=32, learning_rate=1e-5, beta=0.0),
    # with the KL term: a frozen reference model and its log-probs on every rollout
    Case("grpo", batch=8, group=4, prompt_len=32, completion_len=32, learning_rate=1e-5, beta=0.04),
    Case("dpo", batch=4, prompt_len=32, completion_len=32, learning_rate=1e-5, beta=0.1),
)
# QUICK: a smoke run of every row (a small vocabulary, short sequences)
QUICK_CASES = (
    Case("grpo", batch=4, group=2, prompt_len=8, completion_len=8, learning_rate=1e-5, beta=0.0, vocab_size=4096),
    Case("dpo", batch=2, prompt_len=8, completion_len=8, learning_rate=1e-5, beta=0.1, vocab_size=4096),
)
QUICK_REPS = 1
# "trl+fastpo": TRL's trainer after fastpo.integrations.trl.enable()
IMPLEMENTATIONS = ("fastpo", "trl", "trl+fastpo")
# the note of each row names the ratio of the stock TRL row to it
RATIO_LABELS = {"fastpo": "TRL/fastpo", "trl+fastpo": "TRL stock/with fastpo.integrations.trl"}


def shape_text(case: Case) -> str:
    """The table's ``shape``: the case's configuration and the model."""
    parts = [f"algo={case.algorithm}", f"batch={case.batch}"]
    if case.group:
        parts.append(f"group={case.group}")
    parts += [f"prompt={case.prompt_len}", f"completion={case.completion_len}", f"lr={case.learning_rate:g}",
              f"beta={case.beta:g}", f"vocab={case.vocab_size}", f"hidden={MODEL['hidden_size']}",
              f"layers={MODEL['num_hidden_layers']}"]
    return ",".join(parts)


# ----------------------------------------------------------------- model and data


@functools.lru_cache(maxsize=4)
def _word_tokens(vocab_size: int) -> tuple[str, ...]:
    """The merged tokens of ``build_tokenizer``: byte-level ``Ġ`` (a space) followed by 1
    to 4 lowercase letters, in order (every prefix of a token comes before it), as many
    as fill ``vocab_size`` after the special tokens and the 256 byte symbols."""
    room = vocab_size - len(SPECIAL) - 256
    if room < 26:
        raise ValueError(f"vocab_size {vocab_size} is too small: at least {len(SPECIAL) + 256 + 26}")
    words = []
    for n in range(1, 5):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(words) == room:
                return tuple(words)
            words.append("\u0120" + "".join(letters))
    raise ValueError(f"vocab_size {vocab_size} is too large for 4-letter words")


def build_tokenizer(vocab_size: int = VOCAB):
    """A Qwen2 tokenizer (``Qwen2Tokenizer``: Qwen's pre-tokenizer regex, byte-level BPE)
    of exactly ``vocab_size`` entries, built in code: ``<pad>``, ``<eos>``, ``<unk>``, the
    256 byte symbols, then the words of ``_word_tokens`` with the merges that build
    them, so that a space followed by one of those words is one token. No BOS."""
    from tokenizers import pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate(list(SPECIAL) + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in _word_tokens(vocab_size):
        vocab[word] = len(vocab)
        merges.append((word[:-1], word[-1]))
    return Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                          bos_token=None)


def build_model_dir(folder: str | Path, vocab_size: int = VOCAB, seed: int = 0) -> Path:
    """Save the benchmark's Qwen2-style model (random init from ``seed``, fp32) and its
    tokenizer in ``folder``; both trainers load them from there."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer(vocab_size)
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, **MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _words(rng: random.Random, n: int, vocab_size: int) -> str:
    """``n`` words of the vocabulary, each with its leading space: ``n`` tokens."""
    words = _word_tokens(vocab_size)
    return "".join(" " + rng.choice(words)[1:] for _ in range(n))


def make_rows(case: Case, n: int, seed: int, vocab_size: int = VOCAB) -> list[dict]:
    """``n`` rows: ``{"prompt"}`` of ``prompt_len`` words for grpo; for dpo also
    ``chosen`` and ``rejected`` of ``completion_len - 1`` words each (the EOS both
    trainers append makes ``completion_len`` tokens). Every word carries its leading
    space, so ``prompt + response`` (TRL tokenizes the concatenation) gives the tokens of
    the prompt followed by those of the response, as fastpo's separate encoding does."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"prompt": _words(rng, case.prompt_len, vocab_size)}
        if case.algorithm == "dpo":
            row["chosen"] = _words(rng, case.completion_len - 1, vocab_size)
            row["rejected"] = _words(rng, case.completion_len - 1, vocab_size)
        rows.append(row)
    return rows


def write_data(case: Case, folder: str | Path, steps: int, vocab_size: int = VOCAB) -> dict:
    """The training rows (enough prompts or pairs for ``steps`` steps) and a few
    held-out rows, as JSONL files in ``folder``: ``{"train": path, "eval": path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("train", steps * case.prompts_per_step, case.seed), ("eval", EVAL_ROWS, case.seed + 1)):
        path = folder / f"{case.algorithm}-{split}.jsonl"
        with path.open("w") as f:
            for row in make_rows(case, n, seed, vocab_size):
                f.write(json.dumps(row) + "\n")
        paths[split] = str(path)
    return paths


def first_half_reward(prompts, completions, **_) -> list[float]:
    """The GRPO reward of both trainers: the share of the completion's words that start
    with a letter from a to m (deterministic, cheap, and varied within a group, so the
    advantages are not zero)."""
    rewards = []
    for completion in completions:
        words = completion.split()
        rewards.append(sum("a" <= w[0] <= "m" for w in words) / len(words) if words else 0.0)
    return rewards


# ------------------------------------------------------------- the two configs


def fastpo_options(case: Case, paths: dict, model_dir: str, output_dir: str, steps: int,
                   device: str = "cpu") -> dict:
    """The option dict of ``fastpo.engine.train(case.algorithm, ...)``."""
    options = {
        "model": str(model_dir), "data": paths["train"], "eval_data": paths["eval"], "output_dir": str(output_dir),
        "seed": case.seed, "steps": steps, "grad_accum_steps": 1, "max_length": case.prompt_len + case.completion_len,
        "learning_rate": case.learning_rate, "weight_decay": 0.0, "warmup_steps": 0, "lr_schedule": "constant",
        "max_grad_norm": case.max_grad_norm, "eval_every": 0, "save_every": 0, "log_every": 1, "device": device,
        "dtype": "float32", "autocast": "none", "gradient_checkpointing": False, "warm_start_steps": 0,
        "beta": case.beta, "batch_size": case.batch,
    }
    if case.algorithm == "grpo":
        options.update(prompts_per_rollout=case.prompts_per_step, num_generations=case.group,
                       max_new_tokens=case.completion_len, temperature=case.temperature, top_p=1.0, top_k=0,
                       num_iterations=1, loss_type="grpo", scale_rewards="group", clip_eps_low=0.2,
                       kl_kind="k3", rewards=[f"{MODULE}:first_half_reward"])  # k3: TRL's KL estimator
    else:
        options.update(loss_type="sigmoid", label_smoothing=0.0, average=False)
    return options


def trl_options(case: Case, output_dir: str, steps: int, device: str = "cpu") -> dict:
    """The keyword arguments of TRL's ``GRPOConfig`` / ``DPOConfig``."""
    options = {
        "output_dir": str(output_dir), "seed": case.seed, "max_steps": steps, "gradient_accumulation_steps": 1,
        "per_device_train_batch_size": case.batch, "learning_rate": case.learning_rate, "weight_decay": 0.0,
        "warmup_steps": 0, "lr_scheduler_type": "constant", "max_grad_norm": case.max_grad_norm,
        "optim": "adamw_torch", "bf16": False, "fp16": False, "gradient_checkpointing": False,
        "use_cpu": device == "cpu", "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0, "beta": case.beta,
    }
    if case.algorithm == "grpo":
        options.update(num_generations=case.group, max_completion_length=case.completion_len,
                       temperature=case.temperature, top_p=1.0, top_k=0, num_iterations=1, loss_type="grpo",
                       scale_rewards="group", epsilon=0.2)
    else:
        options.update(loss_type=["sigmoid"], label_smoothing=0.0, max_length=None, precompute_ref_log_probs=True)
    return options


def make_trl_config(config_cls, options: dict):
    """``config_cls(**options)`` (TRL's ``GRPOConfig`` or ``DPOConfig``), passing
    ``gradient_checkpointing`` by its newer name ``activation_checkpointing`` where the
    installed transformers has it."""
    options = dict(options)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_cls)}:
        options["activation_checkpointing"] = options.pop("gradient_checkpointing")
    return config_cls(**options)


def describe_fastpo(algorithm: str, config) -> dict:
    """The configuration a fastpo config object (``GRPOConfig``/``DPOConfig`` of
    ``fastpo.engine.config``) trains with, in the terms of ``describe_trl``."""
    autocast = config.autocast
    if autocast == "auto":  # the engine's auto: bf16 autocast on CUDA, none on the CPU
        autocast = "none" if str(config.device).startswith("cpu") else "bfloat16"
    params = "float32" if config.dtype == "auto" else config.dtype
    described = {
        "learning_rate": config.learning_rate, "beta": config.beta, "max_grad_norm": config.max_grad_norm,
        "weight_decay": config.weight_decay, "lr_schedule": config.lr_schedule, "warmup_steps": config.warmup_steps,
        "dtype": "fp32" if params == "float32" and autocast == "none" else f"{params}, autocast {autocast}",
        "gradient_checkpointing": config.gradient_checkpointing, "grad_accum": config.grad_accum_steps,
    }
    if algorithm == "grpo":
        described.update(
            batch=config.prompts_per_rollout * config.num_generations, micro_batch=config.batch_size,
            group=config.num_generations, completion_len=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k, num_iterations=config.num_iterations,
            loss_type=config.loss_type, scale_rewards=config.scale_rewards,
            clip=(config.clip_eps_low, config.clip_eps_high or config.clip_eps_low),
            reference_model=config.beta > 0,
            steps_per_rollout=config.prompts_per_rollout * config.num_generations
            // (config.batch_size * config.grad_accum_steps),
        )
    else:
        described.update(batch=config.batch_size * config.grad_accum_steps, micro_batch=config.batch_size,
                         loss_type=config.loss_type,
                         label_smoothing=config.label_smoothing, reference="precomputed")
    return described


def describe_trl(algorithm: str, args) -> dict:
    """The configuration a TRL ``GRPOConfig``/``DPOConfig`` trains with (read from its
    attributes, after its own ``__post_init__``), in the terms of ``describe_fastpo``."""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    optim = getattr(args.optim, "value", args.optim)
    described = {
        "learning_rate": args.learning_rate, "beta": args.beta, "max_grad_norm": args.max_grad_norm,
        "weight_decay": args.weight_decay, "lr_schedule": schedule, "warmup_steps": args.warmup_steps,
        "dtype": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "gradient_checkpointing": bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing),
        "grad_accum": args.gradient_accumulation_steps,
    }
    if optim != "adamw_torch":
        described["optimizer"] = optim  # fastpo's loop runs torch.optim.AdamW
    if algorithm == "grpo":
        described.update(
            batch=args.per_device_train_batch_size * args.gradient_accumulation_steps,
            micro_batch=args.per_device_train_batch_size, group=args.num_generations,
            completion_len=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, num_iterations=args.num_iterations, loss_type=args.loss_type,
            scale_rewards=args.scale_rewards,
            clip=(args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon),
            reference_model=args.beta > 0,
            steps_per_rollout=args.generation_batch_size
            // (args.per_device_train_batch_size * args.gradient_accumulation_steps),
        )
    else:
        loss = args.loss_type[0] if isinstance(args.loss_type, (list, tuple)) and len(args.loss_type) == 1 \
            else args.loss_type
        described.update(batch=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                         micro_batch=args.per_device_train_batch_size, loss_type=loss,
                         label_smoothing=args.label_smoothing,
                         reference="precomputed" if args.precompute_ref_log_probs else "model every step")
    return described


def expected(case: Case) -> dict:
    """What ``describe_*`` must give for ``case`` (only the keys the case sets)."""
    values = {"batch": case.batch, "learning_rate": case.learning_rate, "beta": case.beta,
              "max_grad_norm": case.max_grad_norm, "dtype": "fp32", "grad_accum": 1, "warmup_steps": 0,
              "lr_schedule": "constant", "weight_decay": 0.0, "gradient_checkpointing": False}
    if case.algorithm == "grpo":
        values.update(group=case.group, completion_len=case.completion_len, temperature=case.temperature,
                      reference_model=case.beta > 0, num_iterations=1, steps_per_rollout=1)
    return values


def differences(first: dict, second: dict) -> list[str]:
    """``key: a != b`` for every key whose values differ (a missing key counts)."""
    out = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key, "<absent>"), second.get(key, "<absent>")
        same = math.isclose(a, b, rel_tol=1e-12) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def check_config(case: Case, described: dict) -> list[str]:
    """How ``described`` departs from ``case`` (empty when it matches)."""
    want = expected(case)
    return differences(want, {key: described.get(key, "<absent>") for key in want})


# --------------------------------------------------------------- one child


def _timing(seconds: list[float]) -> dict:
    times = sorted(s * 1e3 for s in seconds)
    if not times:
        raise ValueError("no timed steps")
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def _prompt_tokens(tokenizer, prompts: list[str]) -> float:
    return statistics.mean(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _preload(*modules: str) -> None:
    """Import ``modules`` now, so that the baseline resident set holds them."""
    for module in modules:
        importlib.import_module(module)


def _run_fastpo(case: Case, args: dict, work: Path) -> dict:
    import torch

    from fastpo.engine import loop
    from fastpo.engine.config import config_class, from_dict
    from fastpo.engine.forward import encode_responses
    from fastpo.engine.runner import train
    from fastpo.kernels import _native

    # Before the baseline: the modules the run imports, and the C++ kernels (loaded, or JIT-built).
    _preload("transformers.models.qwen2.modeling_qwen2", "fastpo.engine.algorithms.grpo",
             "fastpo.engine.algorithms.dpo")
    _native.available(torch.device("cpu"))
    baseline = harness.rss_bytes()
    steps = WARMUP_STEPS + args["reps"]
    config = from_dict(config_class(case.algorithm),
                       fastpo_options(case, args["paths"], args["model_dir"], str(work / "fastpo"), steps))
    described = describe_fastpo(case.algorithm, config)
    problems = check_config(case, described)
    if problems:
        return {"error": "not timed: the configuration differs from the case: " + "; ".join(problems)}

    peak = {}

    def no_checkpoint(*_, **__):  # the last step is done: the peak so far; no checkpoint written
        peak["bytes"] = harness.peak_rss_bytes()
        return None

    loop._save_checkpoint = no_checkpoint
    summary = train(case.algorithm, config)
    with open(summary["metrics_file"]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    if len(times) != steps or "bytes" not in peak:
        return {"error": f"fastpo logged {len(times)} step times for {steps} steps"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    rows = _read_rows(args["paths"]["train"])
    if case.algorithm == "grpo":
        completion = statistics.mean(r["completion_length"] for r in records[WARMUP_STEPS:])
        prompt = _prompt_tokens(tokenizer, [r["prompt"] for r in rows])
    else:  # the engine's own encoding of the responses
        batch = encode_responses(tokenizer, [r["prompt"] for r in rows] * 2,
                                 [r["chosen"] for r in rows] + [r["rejected"] for r in rows], config.max_length)
        completion_tokens = (batch["labels"] != -100).sum(-1).float()
        completion = float(completion_tokens.mean())
        prompt = float((batch["attention_mask"].sum(-1) - completion_tokens).mean())
    return {"timing": _timing(times[WARMUP_STEPS:]), "config": described, "baseline_bytes": baseline,
            "peak_bytes": peak["bytes"], "observed": {"prompt_tokens": prompt, "completion_tokens": completion}}


def _run_trl(case: Case, args: dict, work: Path, with_fastpo: bool = False) -> dict:
    """TRL's trainer for ``case``; with ``with_fastpo``, after fastpo.integrations.trl.enable()."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    _preload("transformers.models.qwen2.modeling_qwen2")  # before the baseline
    if with_fastpo:  # also before the baseline: it imports TRL's trainer modules
        import fastpo.integrations.trl

        fastpo.integrations.trl.enable()
    baseline = harness.rss_bytes()
    steps = WARMUP_STEPS + args["reps"]
    grpo = case.algorithm == "grpo"
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if grpo else (trl.DPOConfig, trl.DPOTrainer)
    trl_args = make_trl_config(config_cls, trl_options(case, str(work / "trl"), steps))
    described = describe_trl(case.algorithm, trl_args)
    problems = check_config(case, described)
    if problems:
        return {"error": "not timed: the configuration differs from the case: " + "; ".join(problems)}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.times, self.peak = None, [], None

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = harness.peak_rss_bytes()

    timer = StepTimer()

    class Timed(trainer_cls):
        def get_batch_samples(self, *a, **k):  # the start of an optimizer step: its batches are fetched
            timer.started = time.perf_counter()
            return super().get_batch_samples(*a, **k)

    tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    rows = _read_rows(args["paths"]["train"])
    extra = {"reward_funcs": first_half_reward} if grpo else {}
    trainer = Timed(model=model, args=trl_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                    callbacks=[timer], **extra)
    trainer.train()
    if len(timer.times) != steps or timer.peak is None:
        return {"error": f"TRL ran {len(timer.times)} steps of {steps}"}
    if grpo:
        lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
        completion = statistics.mean(lengths[WARMUP_STEPS:])
        prompt = _prompt_tokens(tokenizer, [r["prompt"] for r in rows])
    else:  # TRL's own tokenization of the training set
        data = trainer.train_dataset
        completion = statistics.mean(len(ids) for ids in list(data["chosen_ids"]) + list(data["rejected_ids"]))
        prompt = statistics.mean(len(ids) for ids in data["prompt_ids"])
    return {"timing": _timing(timer.times[WARMUP_STEPS:]), "config": described, "baseline_bytes": baseline,
            "peak_bytes": timer.peak, "observed": {"prompt_tokens": prompt, "completion_tokens": completion}}


def child(args: dict) -> dict:
    """One (case, implementation) in a fresh process: ``{"timing", "config", "observed",
    "baseline_bytes", "peak_bytes"}`` or ``{"error"}``."""
    import torch

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    case = Case(**args["case"])
    run = {"fastpo": _run_fastpo, "trl": _run_trl,
           "trl+fastpo": functools.partial(_run_trl, with_fastpo=True)}[args["impl"]]
    with tempfile.TemporaryDirectory(prefix=f"fastpo-e2e-{args['impl']}-") as work:
        try:
            return run(case, args, Path(work))
        except Exception as error:  # a trainer that fails here is a note, not a crash
            traceback.print_exc()  # to the child's stderr
            text = str(error).strip().splitlines()
            return {"error": f"failed: {type(error).__name__}: {text[0][:200] if text else ''}"}


# ------------------------------------------------------------------ the rows


def trl_status(peers: dict | None = None) -> tuple[bool, str]:
    """``(available, note)`` for TRL's trainers: importable, with GRPOTrainer, GRPOConfig,
    DPOTrainer and DPOConfig; the note says why not (or gives the version)."""
    if peers is not None and "trl" in peers and not peers["trl"]["available"]:
        return False, f"trl skipped: {peers['trl']['note']}"
    try:
        import trl
    except Exception as error:  # absent, or a broken install
        return False, f"trl skipped: not importable ({type(error).__name__}); pip install trl"
    missing = [name for name in ("GRPOTrainer", "GRPOConfig", "DPOTrainer", "DPOConfig") if not hasattr(trl, name)]
    if missing:
        return False, f"trl skipped: trl {getattr(trl, '__version__', '?')} has no {', '.join(missing)}"
    return True, f"trl {getattr(trl, '__version__', 'unknown')}"


def case_row(case: Case, impl: str, result: dict) -> dict:
    """The suite-format row of one measured (case, implementation): ``pass`` is
    ``step``; ``extra_mem_MiB`` the peak resident set beyond the imported libraries."""
    row = {"suite": NAME, "impl": impl, "kind": "peer" if impl == "trl" else "fastpo", "dtype": "fp32",
           "shape": shape_text(case), "tokens": case.tokens, "plot": False}
    if "error" in result:
        return {**row, "note": result["error"]}
    extra = max(0, result["peak_bytes"] - result["baseline_bytes"]) / 2**20
    observed = result["observed"]
    note = (f"peak RSS {result['peak_bytes'] / 2**20:.0f} MiB; tokens per sequence: prompt "
            f"{observed['prompt_tokens']:g}, completion {observed['completion_tokens']:g}")
    return {**row, "pass": "step", **result["timing"], "extra_mem_MiB": extra, "note": note}


def compare(case: Case, results: dict) -> list[str]:
    """Why the sides of ``case`` did not run the same configuration (empty when they
    did, or when fewer than two have a result): each against the first, by name."""
    measured = {impl: r for impl, r in results.items() if "error" not in r}
    if len(measured) < 2:
        return []
    (a, ra), *others = sorted(measured.items())
    problems = []
    for b, rb in others:
        problems += [f"config {p}" for p in differences(ra["config"], rb["config"])]
        for key in ("prompt_tokens", "completion_tokens"):
            x, y = ra["observed"][key], rb["observed"][key]
            if case.algorithm == "grpo" and key == "completion_tokens":
                continue  # sampled: equal only in distribution
            if not math.isclose(x, y, rel_tol=1e-9):
                problems.append(f"{key}: {a} {x:g} != {b} {y:g}")
    return problems


def add_ratios(rows: list[dict]) -> None:
    """Append to the note of each fastpo and trl+fastpo row the ratio of stock TRL's
    median step time to its own, and of TRL's extra memory to its own, from the same run."""
    for row in rows:
        if row.get("impl") not in RATIO_LABELS or "median_ms" not in row:
            continue
        trl = next((r for r in rows if r.get("impl") == "trl" and r.get("shape") == row["shape"]
                    and "median_ms" in r), None)
        if trl is None:
            continue
        ratio = f"{RATIO_LABELS[row['impl']]}: time {trl['median_ms'] / row['median_ms']:.2f}x"
        if row.get("extra_mem_MiB"):
            ratio += f", extra memory {trl['extra_mem_MiB'] / row['extra_mem_MiB']:.2f}x"
        row["note"] = f"{row['note']}; {ratio}"


def selected(only: list[str] | None, quick: bool) -> bool:
    """Whether a run of the suite includes the e2e cases: when named by ``--only``, and in
    a full run; not in a plain ``--quick`` run (each case takes minutes on 2 CPU cores)."""
    return NAME in only if only else not quick


def run(device: str = "cpu", peers: dict | None = None, reps: int | None = None, threads: int | None = None,
        cases=None, quick: bool = False) -> tuple[list[dict], list[str]]:
    """Measure every case with fastpo, TRL and TRL with fastpo: ``(rows, notes)``.
    ``quick``: ``QUICK_CASES`` (unless ``cases`` are given), ``QUICK_REPS`` timed steps."""
    if device != "cpu":
        return [], [f"{NAME}: not measured on {device}; the end-to-end cases run on the CPU only"]
    cases = cases or (QUICK_CASES if quick else CASES)
    reps = reps or (QUICK_REPS if quick else DEFAULT_REPS)
    available, trl_note = trl_status(peers)
    notes = [] if available else [f"{NAME}: {trl_note}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastpo-e2e-") as folder:
        model_dirs = {}  # vocabulary size -> the model folder
        for case in cases:
            if case.vocab_size not in model_dirs:
                model_dirs[case.vocab_size] = build_model_dir(Path(folder) / f"model-{case.vocab_size}",
                                                              case.vocab_size)
            model_dir = model_dirs[case.vocab_size]
            paths = write_data(case, Path(folder) / "data", WARMUP_STEPS + reps, case.vocab_size)
            results = {}
            for impl in IMPLEMENTATIONS:
                if impl != "fastpo" and not available:
                    results[impl] = {"error": trl_note}
                    continue
                args = {"case": dataclasses.asdict(case), "impl": impl, "model_dir": str(model_dir),
                        "paths": paths, "reps": reps, "threads": threads}
                try:
                    results[impl] = harness.run_child(MODULE, args)
                except (RuntimeError, ValueError) as error:  # a crashed child: a note row
                    last = str(error).strip().splitlines()[-1:] or [""]
                    results[impl] = {"error": f"child process failed: {last[0][:200]}"}
            problems = compare(case, results)
            if problems:
                results = {impl: {"error": "not compared: the two sides differ: " + "; ".join(problems)}
                           for impl in results}
            for impl in IMPLEMENTATIONS:
                row = case_row(case, impl, results[impl])
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    add_ratios(rows)
    return rows, notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpo.bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the CSV and the Markdown report")
    parser.add_argument("--reps", type=int, default=None, help=f"timed steps after the warm-up (default {DEFAULT_REPS})")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each child (torch.set_num_threads)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    # The suite runs these cases (and imports this module): hand over to it in a new
    # process rather than importing it back.
    command = [sys.executable, "-m", "fastpo.bench", "--only", NAME, "--device", "cpu", "--no-compile"]
    for flag, value in (("--out", args.out), ("--reps", args.reps), ("--threads", args.threads)):
        if value is not None:
            command += [flag, str(value)]
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
