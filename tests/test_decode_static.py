"""decode_static against the reference decode loop: the same tokens, the same width and the same
RNG state afterwards for the same seed; the graph cache and its fallback (with a stand-in
for CUDA graphs on CPU); and, on a CUDA machine, real graphs against the eager static loop."""

from __future__ import annotations

import contextlib
import string
import time
import warnings

import pytest
import torch

import apactl.sampling.static as ds
from apactl.data import left_pad
from apactl.sampling import SamplingSpec, response_mask
from apactl.sampling.loop import decode_loop
from apactl.sampling.static import clear_graphs, decode_static
from apactl.testing import make_tiny_llama, make_tiny_tokenizer

TEXTS = ("hi", "tell me a story", "abc", "why is the sky blue?", "x", "ok then")


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, layers=2, seed=0).eval()
    q, m = left_pad([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    # A random model spreads its mass over ~100 ids: make 13 of them EOS so rows end early.
    eos = [tok.eos_token_id] + tok.convert_tokens_to_ids(list(string.ascii_lowercase[:12]))
    return model, tok, q, m, eos


@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    clear_graphs()
    yield
    clear_graphs()


def reference(model, q, m, eos, pad_id, seed, n_new=48, **sampling):
    """(tokens, torch.rand drawn right after): the reference loop under ``seed``."""
    spec = SamplingSpec(max_new_tokens=n_new, **sampling)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = decode_loop(model, q, m, spec, eos, pad_id)
    return out, torch.rand(4, device=q.device)


def static(model, q, m, eos, pad_id, seed, n_new=48, temperature=1.0, top_k=0, top_p=1.0,
           **kw):
    torch.manual_seed(seed)
    out = decode_static(model, q, m, max_new_tokens=n_new, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos=eos, pad_id=pad_id, **kw)
    return out, torch.rand(4, device=q.device)


SETTINGS = [
    {},
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_p": 0.9},
    {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sampling", SETTINGS)
def test_same_tokens_width_and_rng_as_reference(tiny, sampling, seed):
    model, tok, q, m, eos = tiny
    ref, ref_after = reference(model, q, m, eos, tok.pad_token_id, seed, **sampling)
    out, after = static(model, q, m, eos, tok.pad_token_id, seed, cuda_graphs=False, **sampling)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    assert torch.equal(after, ref_after)  # the RNG is left where the reference leaves it


def test_rows_end_early_and_the_output_is_trimmed(tiny):
    model, tok, q, m, eos = tiny
    ref, _ = reference(model, q, m, eos, tok.pad_token_id, seed=1)
    out, _ = static(model, q, m, eos, tok.pad_token_id, seed=1, cuda_graphs=False)
    lengths = response_mask(out, eos).sum(1)
    assert out.shape[1] < 48  # every row ended: trimmed to the last row's EOS
    assert lengths.min() < out.shape[1]  # ...and some rows ended well before it
    assert torch.equal(out, ref)
    tail = response_mask(out, eos) == 0
    assert (out[tail] == tok.pad_token_id).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_every_does_not_change_tokens_or_rng(tiny, seed):
    model, tok, q, m, eos = tiny
    runs = [static(model, q, m, eos, tok.pad_token_id, seed, check_every=k, cuda_graphs=False)
            for k in (1, 3, 16)]
    for out, after in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert torch.equal(after, runs[0][1])


@pytest.mark.parametrize("case", ["pad_is_eos", "no_eos_hit", "one_token", "one_row",
                                  "cache_multiple", "eager_attention"])
def test_edge_cases_match_reference(tiny, case):
    model, tok, q, m, eos = tiny
    pad, n_new, kw = tok.pad_token_id, 24, {}
    if case == "pad_is_eos":  # SmolLM2: pad == eos
        pad = eos[1]
    elif case == "no_eos_hit":
        eos = [tok.eos_token_id]
    elif case == "one_token":
        n_new = 1
    elif case == "one_row":
        q, m = q[3:4, -m[3].sum():], m[3:4, -m[3].sum():]
    elif case == "cache_multiple":
        kw = {"cache_multiple": 64}
    elif case == "eager_attention":
        model = make_tiny_llama(tok, layers=2, seed=0).eval()
        model.set_attn_implementation("eager")
    ref, ref_after = reference(model, q, m, eos, pad, seed=3, n_new=n_new, temperature=0.8)
    out, after = static(model, q, m, eos, pad, seed=3, n_new=n_new, temperature=0.8,
                        cuda_graphs=False, **kw)
    assert torch.equal(out, ref) and torch.equal(after, ref_after)
    if case == "no_eos_hit":
        assert out.shape[1] == n_new


def test_bad_inputs_raise(tiny):
    model, tok, q, m, eos = tiny
    with pytest.raises(ValueError):
        static(model, q, m[:, 1:], eos, tok.pad_token_id, 0)
    with pytest.raises(ValueError):
        static(model, q, m, eos, tok.pad_token_id, 0, n_new=0)


@contextlib.contextmanager
def no_host_reads():
    """Inside: Python-level reads of tensor values (item, bool, int, tolist, cpu...) raise.
    On a GPU each one would be a sync, and inside a captured graph an error."""
    names = ["item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read inside a decode step: Tensor.{name}")
        return read

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("sampling", [SETTINGS[0], SETTINGS[-1]])
def test_decode_step_reads_nothing_back_to_the_host(tiny, sampling, monkeypatch):
    model, tok, q, m, eos = tiny
    steps = []

    def guarded(*args, **kwargs):
        steps.append(1)
        with no_host_reads():
            return step(*args, **kwargs)

    step = ds.decode_step
    monkeypatch.setattr(ds, "decode_step", guarded)
    out, _ = static(model, q, m, [-1], tok.pad_token_id, 0, n_new=8, cuda_graphs=False,
                    **sampling)
    assert out.shape[1] == 8 and len(steps) == 7


# --------------------------------------------------- graph cache logic, with a stand-in graph
class FakeGraph:
    """Replays by calling the step it was 'captured' from (bound to the same buffers)."""

    def __init__(self, step):
        self.replay = step


@pytest.fixture
def fake_graphs(monkeypatch):
    """CPU stand-in for CUDA graphs: warm-up runs the step (advancing buffers and RNG, as the
    real warm-up does); the 'graph' replays the same bound step."""
    calls = []

    def capture(step, n_warm, device):
        calls.append(n_warm)
        for _ in range(n_warm):
            step()
        return FakeGraph(step)

    monkeypatch.setattr(ds, "graphs_possible", lambda device: True)
    monkeypatch.setattr(ds, "capture_graph", capture)
    ds.reset_fallback()
    return calls


def test_graph_path_captures_once_and_matches_reference(tiny, fake_graphs):
    model, tok, q, m, eos = tiny
    ref, ref_after = reference(model, q, m, eos, tok.pad_token_id, seed=1, temperature=0.7)
    for _ in range(2):  # first call captures (then restarts the rollout), second replays
        out, after = static(model, q, m, eos, tok.pad_token_id, seed=1, temperature=0.7,
                            cuda_graphs=True)
        assert torch.equal(out, ref) and torch.equal(after, ref_after)
    assert fake_graphs == [2] and ds.GRAPH_FALLBACK_REASON is None
    assert ds.cached_graphs() == 1
    static(model, q[:3], m[:3], eos, tok.pad_token_id, seed=1, cuda_graphs=True)  # new shape
    assert len(fake_graphs) == 2 and ds.cached_graphs() == 2
    clear_graphs()
    assert ds.cached_graphs() == 0


def test_reallocated_parameters_rebuild_the_graph(tiny, fake_graphs):
    model, tok, q, m, eos = tiny
    static(model, q, m, eos, tok.pad_token_id, seed=0, cuda_graphs=True)
    w = model.model.norm.weight
    old = w.data
    try:
        w.data = old.clone()  # same values, new storage: the old graph would read freed memory
        static(model, q, m, eos, tok.pad_token_id, seed=0, cuda_graphs=True)
        assert len(fake_graphs) == 2
    finally:
        w.data = old


def test_capture_failure_falls_back_once_with_reason(tiny, fake_graphs, monkeypatch):
    model, tok, q, m, eos = tiny
    tried = []

    def broken(step, n_warm, device):
        tried.append(1)
        step()  # a failed capture can leave the buffers and the RNG advanced
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ds, "capture_graph", broken)
    ref, ref_after = reference(model, q, m, eos, tok.pad_token_id, seed=2)
    with pytest.warns(RuntimeWarning, match="CUDA graphs off"):
        out, after = static(model, q, m, eos, tok.pad_token_id, seed=2, cuda_graphs=True)
    assert torch.equal(out, ref) and torch.equal(after, ref_after)
    assert "not permitted" in ds.GRAPH_FALLBACK_REASON
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        out, _ = static(model, q, m, eos, tok.pad_token_id, seed=2, cuda_graphs=True)
    assert torch.equal(out, ref) and tried == [1]  # not retried for the same shape


def test_graphs_requested_on_cpu_run_eagerly(tiny, monkeypatch):
    model, tok, q, m, eos = tiny
    ds.reset_fallback()
    ref, _ = reference(model, q, m, eos, tok.pad_token_id, seed=0)
    with pytest.warns(RuntimeWarning):
        out, _ = static(model, q, m, eos, tok.pad_token_id, seed=0, cuda_graphs=True)
    assert torch.equal(out, ref) and "not CUDA" in ds.GRAPH_FALLBACK_REASON


def test_smaller_batch_replays_the_larger_batch_graph(tiny, fake_graphs):
    """Before: the graph key held the exact row count, so a last chunk of 5 rows after chunks
    of 6 (or an evaluation batch) captured a second graph with its own KV cache."""
    model, tok, q, m, eos = tiny
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


# ------------------------------------------------------------------------------ real CUDA
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_cuda(tiny):
    model, tok, q, m, eos = tiny
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = make_tiny_llama(tok, layers=2, seed=0).eval().cuda()
    return cuda, tok, q.cuda(), m.cuda(), eos


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sampling", SETTINGS)
def test_cuda_graph_draws_what_eager_draws(tiny_cuda, sampling):
    model, tok, q, m, eos = tiny_cuda
    eager = static(model, q, m, eos, tok.pad_token_id, 5, cuda_graphs=False, **sampling)
    before = ds.CAPTURE_COUNT
    for _ in range(2):  # capture, then pure replay
        graph = static(model, q, m, eos, tok.pad_token_id, 5, cuda_graphs=True, **sampling)
        assert ds.GRAPH_FALLBACK_REASON is None, ds.GRAPH_FALLBACK_REASON
        assert torch.equal(graph[0], eager[0])
        assert torch.equal(graph[1], eager[1])  # same RNG consumption
    assert ds.CAPTURE_COUNT == before + 1


@pytest.mark.gpu
@gpu
def test_cuda_static_loop_agrees_with_reference(tiny_cuda):
    """Different attention lengths may round differently on a GPU: a flipped draw changes the
    rest of its row only (RNG use does not depend on values), so compare whole rows."""
    model, tok, q, m, eos = tiny_cuda
    same = total = 0
    for seed in range(4):
        ref, _ = reference(model, q, m, eos, tok.pad_token_id, seed, temperature=0.7)
        out, _ = static(model, q, m, eos, tok.pad_token_id, seed, temperature=0.7)
        width = max(ref.shape[1], out.shape[1])
        pad = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=tok.pad_token_id)
               for x in (ref, out)]
        same += int((pad[0] == pad[1]).all(1).sum())
        total += ref.shape[0]
    assert same >= 0.9 * total, f"{same}/{total} rows identical"


@pytest.mark.gpu
@gpu
def test_cuda_graph_shared_across_prompt_lengths(tiny_cuda):
    """cache_multiple rounds P + N up: prompts one column shorter reuse the same graph."""
    model, tok, q, m, eos = tiny_cuda
    before = ds.CAPTURE_COUNT
    for cols in (slice(None), slice(1, None)):
        args = (model, q[:, cols], m[:, cols], eos, tok.pad_token_id, 7)
        eager = static(*args, cache_multiple=64, cuda_graphs=False)
        graph = static(*args, cache_multiple=64, cuda_graphs=True)
        assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])
    assert ds.CAPTURE_COUNT == before + 1, ds.GRAPH_FALLBACK_REASON


@pytest.mark.gpu
@gpu
def test_cuda_graph_bf16_faster_than_eager(tiny_cuda):
    _, tok, q, m, _ = tiny_cuda
    model = make_tiny_llama(tok, layers=2, seed=0).eval().to("cuda", torch.bfloat16)
    args = (model, q, m, [-1], tok.pad_token_id, 0)  # no EOS: every call runs 64 steps
    seconds = {}
    for graphs in (False, True):
        for _ in range(2):  # warm-up (and capture)
            static(*args, n_new=64, cuda_graphs=graphs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            static(*args, n_new=64, cuda_graphs=graphs)
        torch.cuda.synchronize()
        seconds[graphs] = (time.perf_counter() - t0) / 3
    assert ds.GRAPH_FALLBACK_REASON is None, ds.GRAPH_FALLBACK_REASON
    assert seconds[True] < seconds[False], seconds
