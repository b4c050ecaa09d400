"""The character-level tokenizer of ``builtin:tiny``, built in code (nothing is downloaded).

One token per character of ``CHARACTERS`` plus four special tokens. It is a Hugging Face
``PreTrainedTokenizerFast`` around a ``tokenizers`` BPE model with no merges (so every
character is its own token), which means ``save_pretrained`` writes a plain
``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads back with no custom code.
"""

from __future__ import annotations

import string

__all__ = ["CHARACTERS", "SPECIAL_TOKENS", "build_char_tokenizer"]

# Digits, '+' and '=' for the addition task, letters and punctuation for instructions and
# judge prompts (issue 7), space and newline as separators: the built-in model's vocabulary.
# A task that writes more characters (countdown's '*' and '/') asks for them as
# ``extra_characters``, appended after these: every id here stays, and builtin:tiny on the
# addition task keeps its vocabulary size, so its initialization at a given seed and its
# checkpoints are unchanged.
CHARACTERS = string.digits + string.ascii_letters + " \n+-=?:.,!'()"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_char_tokenizer(extra_characters: str = ""):
    """The ``PreTrainedTokenizerFast`` of the built-in model.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``CHARACTERS`` in order,
    then the ``extra_characters`` a task needs beyond them (those not already there).
    ``encode`` adds no special tokens (the training code places bos/eos itself); a
    character outside the vocabulary becomes ``<unk>``. The tokenizer pads on the left, as
    batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for char in CHARACTERS + extra_characters:
        vocab.setdefault(char, len(vocab))
    # No pre-tokenizer and no merges: the BPE model splits the text into its characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        model_max_length=1024,
        **SPECIAL_TOKENS,
    )
