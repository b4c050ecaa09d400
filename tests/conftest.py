"""Test setup: without a CUDA device, Triton kernels run on CPU tensors through
Triton's interpreter, which must be switched on before triton is imported."""

import collections
import itertools
import os

import torch

# Under pytest-xdist (`make test`: two workers on CI's two cores) each worker gets its
# share of the cores, and so do the processes the tests start: threads beyond the cores
# only contend, and the engine's small models run no faster on two threads than on one.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastpo.kernels import _native  # noqa: E402
from fastpo.kernels._backend import HAS_TRITON, triton_interpreter_enabled  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Triton runs on the CPU only through the interpreter; on a GPU machine the interpreter
# stays off and the Triton kernels are tested by the gpu-marked tests on CUDA tensors.
CPU_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and triton_interpreter_enabled() else [])
# The native extension covers only some ops (NATIVE_OPS), token_logprobs among them; it
# is JIT-built here once per machine when it is not installed (a warning says if it can't).
LOGPROB_BACKENDS = CPU_BACKENDS + (["cpp"] if _native.available(torch.device("cpu")) else [])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # Files with the most slow tests first: under `make test` each file runs whole on one
    # of two workers, and the suite ends soonest when the longest files start first.
    slow_per_file = collections.Counter(item.path for item in items if "slow" in item.keywords)
    items.sort(key=lambda item: -slow_per_file[item.path])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_cache_ids = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _session_fastpo_cache(tmp_path_factory):
    """The engine caches warm starts across runs in FASTPO_CACHE (engine/warm_start.py):
    never the user's cache in a test; module-scoped runs share this one."""
    os.environ["FASTPO_CACHE"] = str(tmp_path_factory.getbasetemp() / "fastpo-cache" / "session")


@pytest.fixture(autouse=True)
def _fastpo_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty warm-start cache (created on first use)."""
    monkeypatch.setenv("FASTPO_CACHE", str(tmp_path_factory.getbasetemp() / "fastpo-cache" / str(next(_cache_ids))))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Every backend that can run on CPU tensors here."""
    return request.param


@pytest.fixture(params=LOGPROB_BACKENDS)
def logprobs_backend(request):
    """Every backend that runs token_logprobs on CPU tensors here."""
    return request.param


@pytest.fixture(params=["native", "torch", "torch_second_round"])
def top_p_cut_path(request, monkeypatch):
    """The top-p cut of the torch backend on the CPU (kernels/logprobs.py ``_top_p_cut``):
    csrc/'s when the extension is built; the torch ops' otherwise, from the candidates of
    the cut's bin, or, with a single candidate (hardly ever enough), from their second
    histogram round, the GPU's path."""
    if request.param == "native":
        if not _native.top_p_cut_available():
            pytest.skip(f"native extension unavailable: {_native.unavailable_reason()}")
    else:
        monkeypatch.setattr(_native, "top_p_cut_available", lambda: False)
    if request.param == "torch_second_round":
        from fastpo.kernels import logprobs

        monkeypatch.setattr(logprobs, "TOP_P_CANDIDATES", 1)
    return request.param


@pytest.fixture(scope="module")
def tiny_value_model():
    """A random one-layer reward model (a score head, seed 1) on the countdown task's
    characters, in eval mode, and its tokenizer: the reasoning strategies' value head."""
    from fastpo.engine.algorithms.reward import load_reward_model
    from fastpo.engine.countdown import CountdownTask

    model, tokenizer = load_reward_model("builtin:tiny", seed=1, head_std=None, characters=CountdownTask.characters)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_countdown():
    """A random one-layer Llama (seed 0) on the countdown task's characters, in eval mode,
    and its tokenizer: the reasoning strategies' and the tree rollout's model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpo.engine.countdown import CountdownTask
    from fastpo.engine.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(CountdownTask.characters)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer
