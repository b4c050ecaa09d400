"""The built-in tokenizer and model, local checkpoints, and the `kernels` name guard."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpo.engine._shadowing import hide_repository_kernels
from fastpo.engine.models import load_causal_lm
from fastpo.engine.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_tokenizer_is_one_token_per_character():
    tokenizer = build_char_tokenizer()
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(set(CHARACTERS))
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    text = "Q: 12+34=?\nA: 46. (x, y!) '-'"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)  # no special tokens added, one id per character
    assert ids == [tokenizer.convert_tokens_to_ids(c) for c in text]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("1é2") == [tokenizer.convert_tokens_to_ids("1"), 3, tokenizer.convert_tokens_to_ids("2")]
    with_specials = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert tokenizer.decode(with_specials, skip_special_tokens=True) == text


def test_tokenizer_pads_left():
    batch = build_char_tokenizer()(["1+1=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_tokenizer_save_and_load_offline(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = CHARACTERS + "12+34=46"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, 2, "left")


def test_builtin_tiny_forward_and_seeded_init():
    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    ids = torch.tensor([tokenizer.encode("12+34=46"), tokenizer.encode("7+8=15\n\n")])
    logits = model(ids).logits
    assert logits.shape == (2, 8, len(tokenizer)) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()

    before = torch.random.get_rng_state()
    same, _ = load_causal_lm("builtin:tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    other, _ = load_causal_lm("builtin:tiny", seed=4)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(q, r) for q, r in zip(same.parameters(), other.parameters()))
    assert torch.equal(same(ids).logits, logits)


def test_local_checkpoints_load_offline(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tokenizer = load_causal_lm("builtin:tiny", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    # A small Hugging Face model of another family, built from a config in the test.
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    qwen.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")

    ids = torch.tensor([tokenizer.encode("3+4=7")])
    for name, original in [("tiny", model), ("qwen", qwen)]:
        loaded, loaded_tokenizer = load_causal_lm(str(tmp_path / name))
        assert type(loaded) is type(original)
        assert loaded_tokenizer.encode("3+4=7") == ids[0].tolist()
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=0)
    half, _ = load_causal_lm(str(tmp_path / "tiny"), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bad_model_names(tmp_path):
    with pytest.raises(ValueError, match="'builtin:huge' is not a built-in model; choose one of builtin:tiny"):
        load_causal_lm("builtin:huge")
    with pytest.raises(ValueError, match="neither a built-in model.*nor a local checkpoint folder"):
        load_causal_lm(str(tmp_path / "missing"))


def test_repository_kernels_folder_is_never_imported_as_kernels():
    # Run from the repository root, where the root is on sys.path (as for python -m).
    # transformers' probe for Hugging Face's `kernels` package would import kernels/ as
    # `kernels` when a model is built; importing fastpo.engine first must prevent it.
    script = (
        "import sys, fastpo.engine\n"
        "from fastpo.engine.models import load_causal_lm\n"
        "load_causal_lm('builtin:tiny')\n"
        "from transformers.utils import import_utils\n"
        "assert not import_utils.is_kernels_available()\n"
        "assert sys.modules['kernels'] is None, sys.modules['kernels']\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')]\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_guard_leaves_other_kernels_packages_alone(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    monkeypatch.syspath_prepend(str(REPO))
    assert hide_repository_kernels() is True and sys.modules["kernels"] is None

    monkeypatch.delitem(sys.modules, "kernels")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '0.9'\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a Hugging Face-like `kernels` found first
    assert hide_repository_kernels() is False and "kernels" not in sys.modules
