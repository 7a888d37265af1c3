"""Memory that scales: decode graphs and their KV caches freed at a rollout's end, capture
shapes bucketed, the scoring budget in bytes (vocabulary included), the log-softmax chunked."""

from __future__ import annotations

import string

import pytest
import torch

import apactl.sampling.static as ds
from apactl.data import left_pad
from apactl.losses import entropy_from_logits, logprobs_from_logits
from apactl.rl.rollout import scoring_rows
from apactl.sampling.static import capture_shape, decode_static
from apactl.testing import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture
def fake_graphs(monkeypatch):
    """CPU stand-in for CUDA graphs (as in test_decode_static): the 'graph' replays the step."""
    calls = []

    class Graph:
        def __init__(self, step):
            self.replay = step

    def capture(step, n_warm, device):
        calls.append(n_warm)
        for _ in range(n_warm):
            step()
        return Graph(step)

    monkeypatch.setattr(ds, "graphs_possible", lambda device: True)
    monkeypatch.setattr(ds, "capture_graph", capture)
    ds.clear_graphs()
    ds.reset_fallback()
    yield calls
    ds.clear_graphs()


@pytest.mark.parametrize(("b", "p", "n", "mult", "expect"), [
    (1, 10, 16, 64, (8, 64)), (5, 10, 16, 64, (8, 64)), (8, 50, 14, 64, (8, 64)),
    (9, 50, 15, 64, (16, 128)), (33, 1, 1, 1, (64, 2)), (64, 100, 28, 64, (64, 128)),
    (65, 5, 5, 8, (128, 16)), (130, 5, 5, 8, (192, 16)),
])
def test_capture_shape_buckets_rows_and_cache_length(b, p, n, mult, expect):
    assert capture_shape(b, p, n, mult) == expect


def test_smaller_batch_replays_the_larger_batch_graph(fake_graphs):
    """Before: the graph key held the exact row count, so a last chunk of 5 rows after chunks
    of 6 (or an evaluation batch) captured a second graph with its own KV cache."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, seed=0).eval()
    texts = ("hi", "tell me a story", "abc", "why is the sky blue?", "x", "ok then")
    q, m = left_pad([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    eos = [tok.eos_token_id] + tok.convert_tokens_to_ids(list(string.ascii_lowercase[:12]))
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, eos=eos,
              pad_id=tok.pad_token_id, cuda_graphs=True, cache_multiple=64, bucket_rows=True)
    for rows in (slice(0, 6), slice(1, 6), slice(0, 2)):
        out = decode_static(model, q[rows], m[rows], **kw)
        n = out.shape[0]
        assert n == len(range(*rows.indices(6)))
        # each row pads after its first EOS; the width is set by real rows only (filler rows
        # end at once), so some real row ends at the last column or runs to the limit
        hit = torch.isin(out, torch.tensor(eos))
        ends = [int(r.nonzero()[0]) if r.any() else out.shape[1] - 1 for r in hit]
        assert max(ends) == out.shape[1] - 1
    assert len(fake_graphs) == 1 and ds.cached_graphs() == 1


def test_rollout_frees_decode_graphs_before_the_update(tmp_path, monkeypatch, fake_graphs):
    """Before: graphs and static KV caches (2.4 GB at 1.7B, B=64) stayed cached through scoring
    and the update. The CPU decode is routed through the graph path here (fake capture)."""
    from helpers import tiny_recipe

    import apactl.sampling.backends as backends
    from apactl.hooks import Hooks
    from apactl.workflows.align import run_align

    def graph_decode(model, q, m, spec, eos, pad_id):
        return decode_static(model, q, m, max_new_tokens=spec.max_new_tokens,
                             temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                             eos=eos, pad_id=pad_id, cuda_graphs=True, cache_multiple=64)

    monkeypatch.setattr(backends, "cpu_loop", graph_decode)
    seen = []
    run_align(tiny_recipe("align", tmp_path, "train.iterations=2"),
              hooks=Hooks(on_rollout=lambda it, *a: seen.append(ds.cached_graphs())))
    assert fake_graphs and seen == [0, 0]  # captured during each rollout, freed at its end


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
