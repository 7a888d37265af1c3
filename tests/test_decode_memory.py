"""Memory that scales: decode graphs and their KV caches freed at a rollout's end, capture
shapes bucketed, the scoring budget in bytes (vocabulary included), the log-softmax chunked."""

from __future__ import annotations

import pytest
import torch

import apactl.sampling.static as ds
from apactl.data import left_pad
from apactl.losses import entropy_from_logits, logprobs_from_logits
from apactl.rl.rollout import scoring_rows
from apactl.sampling.static import capture_shape
from apactl.testing import make_tiny_llama, make_tiny_tokenizer


@pytest.mark.parametrize(("b", "p", "n", "mult", "expect"), [
    (1, 10, 16, 64, (8, 64)), (5, 10, 16, 64, (8, 64)), (8, 50, 14, 64, (8, 64)),
    (9, 50, 15, 64, (16, 128)), (33, 1, 1, 1, (64, 2)), (64, 100, 28, 64, (64, 128)),
    (65, 5, 5, 8, (128, 16)), (130, 5, 5, 8, (192, 16)),
])
def test_capture_shape_buckets_rows_and_cache_length(b, p, n, mult, expect):
    assert capture_shape(b, p, n, mult) == expect


def test_chunked_log_softmax_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 8
    labels = torch.randint(0, 50, (3, 7), generator=g)
    for t in (1.0, 0.7):
        whole = torch.log_softmax(logits / t, -1).gather(-1, labels[..., None]).squeeze(-1)
        chunked = logprobs_from_logits(logits, labels, t, chunk_bytes=4 * 50 * 2)  # 2 rows
        assert torch.equal(chunked, whole)
        logp = torch.log_softmax(logits / t, -1)
        assert torch.equal(entropy_from_logits(logits, t, chunk_bytes=4 * 50 * 3),
                           -(logp.exp() * logp).sum(-1))
    lp = logits.clone().requires_grad_(True)
    logprobs_from_logits(lp, labels, chunk_bytes=400).sum().backward()
    assert lp.grad is not None and lp.grad.shape == lp.shape


def test_scoring_rows_budget_counts_the_vocabulary():
    """Before: a token budget only (16384 tokens): 32 rows of 512 tokens whatever the vocabulary,
    i.e. 2 x 32 x 512 x 128k x 4 B = 34 GB of fp32 logits at 128k."""
    tokens, nbytes = 16384, 4 << 30
    small = scoring_rows(512, 49_152, tokens, nbytes)
    large = scoring_rows(512, 128_256, tokens, nbytes)
    assert small == 21 and large == 8  # 2 * rows * 512 * V * 4 <= 4 GiB
    assert 2 * large * 512 * 128_256 * 4 <= nbytes
    assert scoring_rows(64, 1000, tokens, nbytes) == 256  # small vocab: the token budget binds
    assert scoring_rows(100_000, 128_256, tokens, nbytes) == 1  # never 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_smaller_chunk_reuses_capture_and_rollout_end_frees_it():
    from apactl.sampling import SamplingSpec, release_decode_memory, sample, used_cuda_graph

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, seed=0).eval().cuda()
    texts = ("hi", "tell me a story", "abc", "why is the sky blue?", "x", "ok then")
    q, m = left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    q, m = q.cuda(), m.cuda()
    spec = SamplingSpec(max_new_tokens=12)
    ds.clear_graphs()
    before = ds.CAPTURE_COUNT
    for rows in (6, 5, 3):  # a full chunk, a smaller last chunk, an evaluation batch
        resp, _ = sample(model, q[:rows], m[:rows], spec, [tok.eos_token_id], tok.pad_token_id)
        assert resp.shape[0] == rows and used_cuda_graph(), ds.GRAPH_FALLBACK_REASON
    assert ds.CAPTURE_COUNT == before + 1 and ds.cached_graphs() == 1
    held = torch.cuda.memory_reserved()
    release_decode_memory()
    assert ds.cached_graphs() == 0 and torch.cuda.memory_reserved() <= held
