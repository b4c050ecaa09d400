"""The fixed-shape selections behind top-k/top-p log-probs and Clip-Cov/KL-Cov: the block
selection of the k largest values against torch.topk, and the top-p cut of the torch
backend against Hugging Face's TopPLogitsWarper on rows where the cut is deep and the
values near it are dense (flat rows), the hard case of its histogram."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from fastpo.kernels import logprobs as logprobs_module
from fastpo.kernels._select import largest_values


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4096, 32003])
@pytest.mark.parametrize("values", ["distinct", "ties", "bf16"])
def test_largest_values_equal_torch_topk(n, values):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    if values == "ties":  # many equal values straddle every block boundary and the k-th
        x = torch.randint(0, 4, (5, n), generator=g).float()
    elif values == "bf16":
        x = (x * 4).to(torch.bfloat16).float()
    for k in {1, 2, 8, 50, 104, 700} & set(range(1, n + 1)):
        assert torch.equal(largest_values(x, k), torch.topk(x, k).values), k


@pytest.mark.parametrize(
    "vocab,scale,top_p,dtype",
    [(1000, 0.05, 0.9, torch.float32), (4096, 0.05, 0.5, torch.float32), (4096, 2.0, 0.9, torch.float32),
     (4096, 8.0, 0.95, torch.float32),
     # float64: at this V a float32 mass sum rounds by about a token's mass near the cut,
     # HF's and ours alike
     (151936, 2.0, 0.9, torch.float64)],
)
def test_top_p_cut_keeps_exactly_hf_kept_set(vocab, scale, top_p, dtype, top_p_cut_path):
    # rows of distinct values: the kept set {z - max >= cut} must be HF's exactly, and the
    # kept mass, when returned (always but from the second round), the masked sum's
    rows = min(64, logprobs_module._torch_chunk_rows(vocab, torch.device("cpu")))  # the workspace holds one chunk
    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(rows, vocab, generator=g, dtype=dtype) * scale
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    workspace = logprobs_module._cut_workspace(rows, vocab, dtype, z.device, (None, top_p))
    cut, kept_mass = logprobs_module._chunk_cut(shifted, e, None, top_p, workspace)
    hf = TopPLogitsWarper(top_p=top_p)(None, z.clone()) != float("-inf")
    assert torch.equal(shifted >= cut, hf)
    assert (kept_mass is None) == (top_p_cut_path == "torch_second_round")
    if kept_mass is not None:
        torch.testing.assert_close(kept_mass, torch.where(hf, e, 0.0).sum(-1, keepdim=True), rtol=1e-5, atol=0)


def test_top_p_cut_of_a_bin_of_many_ties(top_p_cut_path):
    # 400 equal values hold the cut, more than the torch ops' candidates: their second
    # round, or the native sort of the whole bin; the tie straddles p * S and is kept whole
    z = torch.cat([torch.tensor([[4.0, 3.0]]), torch.zeros(1, 400), torch.full((1, 600), -3.0)], dim=1).repeat(3, 1)
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    workspace = logprobs_module._cut_workspace(3, z.shape[1], torch.float32, z.device, (None, 0.9))
    cut, kept_mass = logprobs_module._chunk_cut(shifted, e, None, 0.9, workspace)
    assert torch.equal(shifted >= cut, z >= 0.0)
    assert (kept_mass is None) == (top_p_cut_path != "native")
    if kept_mass is not None:
        torch.testing.assert_close(kept_mass, torch.where(z >= 0.0, e, 0.0).sum(-1, keepdim=True), rtol=1e-6, atol=0)
