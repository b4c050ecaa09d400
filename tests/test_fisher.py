"""fisher_vector_product and linear_fisher_vector_product against the explicit float64
Fisher matrix, and TRPO's fused KL-Hessian-vector product against the double backward
through an eager KL that it replaced."""

import math

import pytest
import torch
from conftest import LOGPROB_BACKENDS
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastpo.engine.algorithms import trpo
from fastpo.kernels import fisher_vector_product, linear_fisher_vector_product


@pytest.fixture(params=LOGPROB_BACKENDS)
def fisher_backend(request):
    """Every backend that runs the Fisher row kernels on CPU tensors here (cpp included)."""
    return request.param


# ------------------------------------------------------------------ references


def explicit_fisher(logits, u, temperature=1.0, mask=None):
    """Row by row in float64: the matrix (diag(p) - p p^T) / T^2, p = softmax(logits / T),
    built explicitly and applied to u. A -inf logit is the most negative finite float32, as
    in every fastpo kernel (probability 0)."""
    vocab = logits.shape[-1]
    shape = logits.shape[:-1]
    rows = logits.detach().reshape(-1, vocab).double().clamp(min=-3.4028234663852886e38)
    tangents = u.detach().reshape(-1, vocab).double()
    temps = torch.as_tensor(temperature, dtype=torch.float64).expand(shape).reshape(-1)
    keep = torch.ones(rows.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        if not keep[r]:
            continue
        p = torch.softmax(rows[r] / temps[r], -1)
        fisher = (torch.diag(p) - torch.outer(p, p)) / temps[r] ** 2
        out[r] = fisher @ torch.where(p > 0, tangents[r], 0.0)
    return out.view(logits.shape)


def check(logits, u, backend, temperature=1.0, mask=None, rel=1e-6):
    out = fisher_vector_product(logits, u, temperature=temperature, mask=mask, backend=backend)
    assert out.shape == logits.shape and out.grad_fn is None
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    expected = explicit_fisher(logits, u, temperature, mask)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert (out.double() - expected).abs().max().item() <= rel * scale + 1e-12
    return out


# ------------------------------------------------------------------ the row op


@pytest.mark.parametrize("vocab", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_explicit_fisher(fisher_backend, vocab, dtype):
    logits = (torch.randn(2, 3, vocab, dtype=torch.float64) * 2).to(dtype)
    u = torch.randn(2, 3, vocab, dtype=torch.float64).to(dtype)
    out = check(logits, u, fisher_backend, temperature=0.7, rel=1e-12 if dtype == torch.float64 else 1e-5)
    if vocab == 1:  # one token: p = 1, no curvature
        assert (out == 0).all()


def test_per_row_temperature_and_a_strided_layout(fisher_backend):
    # logits[:, :-1] used in place; u from a transposed buffer; one temperature per sequence.
    logits = (torch.randn(3, 6, 33, dtype=torch.float64) * 2)[:, :-1]
    u = torch.randn(5, 3, 33, dtype=torch.float64).transpose(0, 1)
    temperature = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    check(logits, u, fisher_backend, temperature=temperature, rel=1e-12)


def test_masked_rows_give_zero_and_are_not_read(fisher_backend):
    logits = torch.randn(4, 5, 20, dtype=torch.float64)
    u = torch.randn(4, 5, 20, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.4
    mask[0] = False
    clean = check(logits, u, fisher_backend, temperature=1.3, mask=mask, rel=1e-12)
    assert (clean[~mask] == 0).all()
    logits[~mask] = float("nan")
    u[~mask] = float("inf")
    garbage = fisher_vector_product(logits, u, temperature=1.3, mask=mask.float(), backend=fisher_backend)
    assert torch.equal(garbage, clean)


def test_negative_infinity_logits(fisher_backend):
    logits = torch.randn(3, 30, dtype=torch.float64)
    u = torch.randn(3, 30, dtype=torch.float64)
    logits[0, :5] = -math.inf  # excluded tokens: probability 0, zero product even where u is inf
    u[0, :5] = math.inf
    logits[1] = -math.inf  # a fully excluded row is uniform
    logits[2, -3:] = -math.inf
    out = check(logits, u, fisher_backend, temperature=0.7, rel=1e-12)
    assert (out[0, :5] == 0).all()


def test_several_blocks_per_row(fisher_backend):
    # More than one interpreter / C++ block per row and a ragged last block; the explicit
    # matrix would be 20003^2, so the reference is its closed form, in float64.
    logits = torch.randn(2, 20003) * 3
    u = torch.randn(2, 20003)
    out = fisher_vector_product(logits, u, temperature=0.9, backend=fisher_backend)
    p = torch.softmax(logits.double() / 0.9, -1)
    expected = p * (u.double() - (p * u.double()).sum(-1, keepdim=True)) / 0.81
    assert (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(fisher_backend, dtype):
    logits = (torch.randn(3, 257) * 2).to(dtype)
    u = torch.randn(3, 257).to(dtype)
    check(logits, u, fisher_backend, rel=1e-5)  # the inputs are exact in float64; fp32 accumulation


def test_empty(fisher_backend):
    out = fisher_vector_product(torch.randn(0, 4, 9), torch.randn(0, 4, 9), backend=fisher_backend)
    assert out.shape == (0, 4, 9)


def test_bad_input():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"u.shape \(2, 3, 6\) does not match logits.shape \(2, 3, 5\)"):
        fisher_vector_product(logits, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="logits is torch.float32 but u is torch.float64"):
        fisher_vector_product(logits, logits.double())
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        fisher_vector_product(logits, [1.0])
    with pytest.raises(ValueError, match=r"mask.shape \(2, 4\)"):
        fisher_vector_product(logits, logits, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0.0"):
        fisher_vector_product(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match="u must have unit stride"):
        fisher_vector_product(logits, torch.randn(2, 5, 3).transpose(1, 2))
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fisher_vector_product(logits, logits, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name", ["triton", "torch", "cuda"])
def test_cuda_matches_the_closed_form(backend_name, dtype):
    # The compiled kernels: several blocks per row, a sliced layout, a temperature per
    # sequence, a mask and -inf logits, against the closed form in float64.
    from fastpo.kernels import _native

    if backend_name == "cuda" and not _native.available(torch.device("cuda")):
        pytest.skip(f"native extension without CUDA: {_native.unavailable_reason()}")
    logits = (torch.randn(2, 17, 32003, device="cuda") * 3).to(dtype)
    u = torch.randn(2, 17, 32003, device="cuda").to(dtype)
    logits[1, 3, :5000] = -math.inf
    mask = torch.rand(2, 16, device="cuda") > 0.2
    temperature = torch.tensor([[0.7], [1.3]], device="cuda")
    out = fisher_vector_product(logits[:, :-1], u[:, :-1], temperature=temperature, mask=mask, backend=backend_name)
    p = torch.softmax(logits[:, :-1].double() / temperature.double()[..., None], -1)
    u64 = u[:, :-1].double()
    expected = p * (u64 - (p * u64).sum(-1, keepdim=True)) / temperature.double()[..., None] ** 2
    expected = torch.where(mask[..., None], expected, 0.0)
    assert (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


# ------------------------------------------------------------------ through the LM head


def head_reference(hidden, weight, bias, tangents, temperature, softcap, mask):
    """J^T F J t with J the float64 autograd Jacobian of the head (softcap included) and F
    the explicit Fisher matrix."""

    def head(h, w, b):
        logits = h @ w.T + (0 if b is None else b)
        return logits if softcap is None else softcap * torch.tanh(logits / softcap)

    primals = (hidden.double(), weight.double(), None if bias is None else bias.double())
    tangents = tuple(None if t is None else t.double() for t in tangents)
    # Held-fixed parameters: a zero tangent and no part of the product.
    variables = [i for i, p in enumerate(primals) if p is not None]
    tangent = tuple(torch.zeros_like(primals[i]) if tangents[i] is None else tangents[i] for i in variables)

    def of_variables(*values):
        args = list(primals)
        for i, value in zip(variables, values):
            args[i] = value
        return head(*args)

    logits, u = torch.func.jvp(of_variables, tuple(primals[i] for i in variables), tangent)
    _, pullback = torch.func.vjp(of_variables, *(primals[i] for i in variables))
    parts = dict(zip(variables, pullback(explicit_fisher(logits, u, temperature, mask))))
    return [parts.get(i) for i in range(3)]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_matches_the_explicit_fisher_through_the_head(fisher_backend, softcap):
    # float64, chunks of 4 rows over 2 x 5 positions (a ragged last chunk), a bias, a mask,
    # and a temperature per sequence.
    hidden = torch.randn(2, 5, 6, dtype=torch.float64)
    weight = torch.randn(11, 6, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    tangents = (torch.randn_like(hidden), torch.randn_like(weight), torch.randn_like(bias))
    mask = torch.rand(2, 5) > 0.3
    temperature = torch.tensor([[0.7], [1.2]], dtype=torch.float64)
    got = linear_fisher_vector_product(
        hidden, weight, *tangents[:2], bias=bias, d_bias=tangents[2], temperature=temperature, softcap=softcap,
        mask=mask, chunk_size=4, backend=fisher_backend,
    )
    expected = head_reference(hidden, weight, bias, tangents, temperature, softcap, mask)
    for part, want in zip(got, expected):
        assert part.shape == want.shape and part.dtype == torch.float64
        torch.testing.assert_close(part, want, rtol=1e-10, atol=1e-12)
    assert (got[0][~mask] == 0).all()


def test_linear_with_the_head_held_fixed_in_float32(fisher_backend):
    # No tangent for the weight (it is not a variable) and no bias; float32 inputs.
    hidden = torch.randn(7, 16)
    weight = torch.randn(40, 16) / 4
    d_hidden = torch.randn(7, 16)
    grad_hidden, grad_weight, grad_bias = linear_fisher_vector_product(
        hidden, weight, d_hidden, temperature=0.8, chunk_size=3, backend=fisher_backend
    )
    assert grad_weight is None and grad_bias is None and grad_hidden.dtype == torch.float32
    (expected, _, _) = head_reference(hidden, weight, None, (d_hidden, None, None), 0.8, None, None)
    torch.testing.assert_close(grad_hidden.double(), expected, rtol=1e-5, atol=1e-6)


def test_linear_bad_input():
    hidden, weight = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"d_weight.shape \(9, 5\) does not match the expected \(9, 4\)"):
        linear_fisher_vector_product(hidden, weight, hidden, torch.randn(9, 5))
    with pytest.raises(ValueError, match="d_bias was given without bias"):
        linear_fisher_vector_product(hidden, weight, hidden, d_bias=torch.randn(9))
    with pytest.raises(ValueError, match="hidden is torch.float32 but d_hidden is torch.float64"):
        linear_fisher_vector_product(hidden, weight, hidden.double())
    with pytest.raises(ValueError, match=r"weight.shape \(9, 3\) is not \(V, H\)"):
        linear_fisher_vector_product(hidden, torch.randn(9, 3), hidden)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        linear_fisher_vector_product(hidden, weight, hidden, chunk_size=0)


# ------------------------------------------------------------------ TRPO's product


def double_backward_product(model, params, chunks, temperature):
    """The product TRPO took before the fused one: the gradient of the mean eager
    full-vocabulary KL(old || new), built with its graph, back-propagated once more."""
    tokens = sum(int(chunk["mask"].sum()) for chunk in chunks)
    with torch.no_grad():
        old = [trpo.completion_logits(model, chunk) / temperature for chunk in chunks]
    gradient = 0
    with sdpa_kernel(SDPBackend.MATH):
        for chunk, old_logits in zip(chunks, old):
            new = (trpo.completion_logits(model, chunk) / temperature).log_softmax(-1)
            log_p = old_logits.log_softmax(-1)
            kl = (log_p.exp() * (log_p - new)).sum() / tokens
            gradient = gradient + trpo._gradient(kl, params, create_graph=True)
    return lambda vector: trpo._gradient(gradient @ vector, params, retain_graph=True)


def tiny_chunks(vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for rows, length in ((3, 9), (2, 7)):
        mask = torch.zeros(rows, length, dtype=torch.bool)
        mask[:, length // 2 :] = True
        mask[0, -1] = False  # a completion shorter than the others
        chunks.append({
            "input_ids": torch.randint(0, vocab, (rows, length), generator=generator),
            "attention_mask": torch.ones(rows, length, dtype=torch.long),
            "mask": mask,
        })
    return chunks


def gpt2(tied):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=13, n_embd=8, n_layer=1, n_head=2, n_positions=16, tie_word_embeddings=tied)
    return GPT2LMHeadModel(config).double().eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("make_model, temperature", [
    (lambda: gpt2(tied=True), 0.7),  # the LM head is the token embedding: both paths meet in one parameter
    (lambda: gpt2(tied=False), 1.0),
    (llama, 1.3),
])
def test_trpo_product_equals_the_double_backward_hessian_product(make_model, temperature):
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = tiny_chunks(model.config.vocab_size, seed=1)
    fused = trpo.kl_hessian_product(model, params, chunks, temperature)
    reference = double_backward_product(model, params, chunks, temperature)
    for seed in range(2):
        vector = torch.randn(sum(p.numel() for p in params), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed))
        want = reference(vector)
        got = fused(vector)
        assert (got - want).norm() <= 1e-6 * want.norm()
