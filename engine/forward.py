"""Tokenized prompt/response batches and their log-probs, without materialized logits.

Training sequences are ``[bos] prompt response [eos]`` (bos when the tokenizer has one),
right-padded, cut at ``max_length``. ``labels[t]`` is the token at ``t + 1`` when that
token belongs to the response (its eos included) and ``IGNORE_INDEX`` elsewhere, so the
prompt and the padding never enter a loss.

``response_logprobs`` runs the model's decoder for the last hidden states and hands them,
with the LM-head weight, to ``fastpo.kernels.linear_token_logprobs``: the
``(tokens, vocab)`` logits never exist during training.
"""

from __future__ import annotations

import torch

from fastpo.kernels import linear_token_logprobs

__all__ = ["IGNORE_INDEX", "encode_responses", "greedy_completions", "greedy_tokens", "response_logprobs"]

IGNORE_INDEX = -100


def encode_responses(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (all ``(B, T)`` int64,
    ``labels`` already shifted: position ``t`` holds the target predicted from ``t``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, targets = [], []
    for prompt, response in zip(prompts, responses):
        head = bos + tokenizer.encode(prompt, add_special_tokens=False)
        tail = tokenizer.encode(response, add_special_tokens=False) + eos
        ids = (head + tail)[:max_length]
        # The target of position t is ids[t + 1]; only response tokens are targets.
        labels = [ids[t + 1] if t + 1 >= len(head) else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
        rows.append(ids)
        targets.append(labels)
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, target) in enumerate(zip(rows, targets)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lm_head(model):
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear LM head (get_output_embeddings())")
    return head


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    statistics: tuple[str, ...] = (),
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Per-token log-probs ``(B, T)`` float32 of ``labels`` under ``model`` with its logits
    divided by ``temperature``; 0 where a label is ``IGNORE_INDEX``. With
    ``return_entropy`` the pair ``(logprobs, entropy)``. Differentiable; run it under
    ``torch.no_grad()`` for a reference. ``top_k`` (0 disables) and ``top_p`` (1
    disables) give the log-probs of the sampler's truncated distribution, as the
    rollouts record them (-inf for a token outside the kept set). ``statistics``: the
    extra per-token statistics of ``linear_token_logprobs`` from the same pass (then the
    triple ``(logprobs, entropy or None, {name: (B, T)})``; not with top_k/top_p).

    The hidden states come from ``model.model`` (the decoder of Hugging Face causal LMs),
    the head from ``get_output_embeddings()``; a head bias and Gemma 2's
    ``final_logit_softcapping`` are applied as the model's own forward would.
    """
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = decoder(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).last_hidden_state
    head = _lm_head(model)
    return linear_token_logprobs(
        hidden,
        head.weight,
        labels.to(device),
        bias=getattr(head, "bias", None),
        temperature=temperature,
        softcap=getattr(model.config, "final_logit_softcapping", None),
        ignore_index=IGNORE_INDEX,
        return_entropy=return_entropy,
        statistics=statistics,
        top_k=top_k if top_k > 0 else None,
        top_p=top_p,
    )


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's generation tokens: ``[bos] prompt`` (bos when the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def generation_pad_id(tokenizer) -> int:
    """The id that left-pads prompts for generation: pad, else eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_width(encoded: list[list[int]], max_new_tokens: int, max_length: int | None = None) -> int:
    """The longest of the ``encoded`` prompts' lengths; ValueError when it plus
    ``max_new_tokens`` exceeds ``max_length`` (None: no bound)."""
    width = max(len(ids) for ids in encoded)
    if max_length is not None and width + max_new_tokens > max_length:
        raise ValueError(
            f"a prompt of {width} tokens plus max_new_tokens={max_new_tokens} exceeds max_length={max_length}"
        )
    return width


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """``text`` up to the first of ``stop_strings`` it holds (the stop string left out):
    the completion text that rewards and judges see."""
    cuts = [text.index(stop) for stop in stop_strings if stop in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def greedy_tokens(model, tokenizer, encoded: list[list[int]], max_new_tokens: int,
                  logits_processor=None) -> torch.Tensor:
    """``(B, n)`` the greedy continuation tokens of the ``encoded`` prompts (each
    ``[bos] prompt``, left-padded as in training), ``n <= max_new_tokens``: generation
    stops once every row has written eos, and a row that wrote it earlier is padded after
    it. ``logits_processor``: a ``transformers.LogitsProcessorList`` that ``generate``
    calls at every step with the step's logits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = generation_pad_id(tokenizer)
    width = prompt_width(encoded, max_new_tokens)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        logits_processor=logits_processor,
    )
    model.train(was_training)
    return generated[:, width:].cpu()


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                       stop_strings: list[str] = ()) -> list[str]:
    """The greedy completion of each prompt (``[bos] prompt`` left-padded, as in
    training), decoded without special tokens and cut at the first of ``stop_strings``,
    as sampled completions are."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = encode_prompts(tokenizer, prompts[start : start + batch_size])
        tokens = greedy_tokens(model, tokenizer, encoded, max_new_tokens)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        outputs += [cut_at_stop(text, stop_strings) for text in texts]
    return outputs
