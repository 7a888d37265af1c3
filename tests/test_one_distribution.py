"""One distribution under mixed precision: the decode copy, the policy's old log-probs and the
reference compute identically from identical weights (on the CPU, under bf16 autocast, which
runs the CUDA default's numerics); the output heads compute in fp32."""

from __future__ import annotations

import pytest
import torch

from apactl.config import RunConfig
from apactl.data import left_pad
from apactl.precision import Fp32Head, fp32_heads, resolve_precision
from apactl.rl.forward import build_sequences, policy_forward
from apactl.sampling import SamplingSpec, response_mask
from apactl.sampling.loop import decode_loop
from apactl.testing import make_tiny_llama, make_tiny_tokenizer

MIXED = resolve_precision(RunConfig(mixed_precision="bf16"), "cpu")
TEXTS = ("hi", "tell me a story", "abc", "why is the sky blue?")
# Decoding (one position per step, KV cache) and the scoring forward (all positions at once)
# run different matmul shapes, so bf16 may round a few products differently (measured max
# 1e-4 nats here with logits 30 times a random model's; the old whole-model bf16 copy: 3e-4, and
# its scoring forward differed from the policy's, which must be bit-identical).
DECODE_TOL = 2e-3


def _policy(scale: float = 30.0):
    """A tiny fp32 policy whose logits are as large as a trained model's (norm x scale)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, layers=2, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    fp32_heads(model)  # as align does
    return model.eval(), tok


def _inv_freq(model) -> list[torch.dtype]:
    return [b.dtype for n, b in model.named_buffers() if "inv_freq" in n]


def test_decode_copy_casts_matmul_weights_not_buffers_nor_heads():
    policy, _ = _policy()
    copy_ = MIXED.decode_copy(policy)
    assert _inv_freq(copy_) and set(_inv_freq(copy_)) == {torch.float32}  # rotary stays fp32
    assert copy_.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert copy_.model.embed_tokens.weight.dtype == torch.float32
    assert isinstance(copy_.lm_head, Fp32Head) and copy_.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in copy_.parameters())


@torch.no_grad()
def test_sampler_draws_the_distribution_the_policy_scores():
    """The decode copy's per-step log-probs of the drawn tokens equal the policy's scoring
    forward (old log-probs) within DECODE_TOL, and its own scoring forward equals the policy's
    bit for bit (the distribution is the same function of the same weights)."""
    policy, tok = _policy()
    sampler = MIXED.decode_copy(policy)
    q, m = left_pad([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    spec, eos = SamplingSpec(max_new_tokens=16), [tok.eos_token_id]
    steps: list[torch.Tensor] = []
    hook = sampler.lm_head.register_forward_hook(lambda mod, i, out: steps.append(out[:, -1]))
    torch.manual_seed(0)
    with MIXED.autocast():
        resp = decode_loop(sampler, q, m, spec, eos, tok.pad_token_id)
    hook.remove()
    mask = response_mask(resp, eos)
    logits = torch.stack(steps[:resp.shape[1]], dim=1)  # [B, T, V], fp32 from the fp32 head
    assert logits.dtype == torch.float32
    drawn = spec.logprobs(logits, resp)
    seq = build_sequences(q, m, resp, mask, tok.pad_token_id)
    with MIXED.autocast():
        old, _ = policy_forward(policy, seq, resp, spec)
        again, _ = policy_forward(sampler, seq, resp, spec)
    valid = mask.bool()
    assert torch.equal(again[valid], old[valid])
    assert float((drawn - old)[valid].abs().max()) <= DECODE_TOL


def test_heads_compute_in_fp32_under_autocast():
    from apactl.models import score_head

    policy, tok = _policy(scale=1.0)
    h = torch.randn(2, 3, policy.config.hidden_size)
    with MIXED.autocast():
        assert policy.lm_head(h).dtype == torch.float32
        ids = torch.tensor([[5, 6, 7, 8]])
        assert policy(input_ids=ids).logits.dtype == torch.float32
    from transformers import LlamaForSequenceClassification

    critic = LlamaForSequenceClassification(policy.config)
    fp32_heads(critic)
    with MIXED.autocast():
        assert score_head(critic)(h).dtype == torch.float32


def test_reward_model_scores_are_not_rounded_to_bf16(tmp_path):
    """Before: the reward model ran in bf16 and its score was cast up afterwards, so every score
    was a bf16 value (~0.03 apart near 4)."""
    from transformers import LlamaForSequenceClassification

    from apactl.judges.reward_model import RewardModelJudge

    policy, tok = _policy(scale=1.0)
    policy.config.num_labels = 1
    rm = LlamaForSequenceClassification(policy.config)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = RewardModelJudge(str(tmp_path), dtype=torch.bfloat16)
    assert judge.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    scores = judge.score_tensor([[{"role": "user", "content": t}] for t in TEXTS],
                                ["yes", "no", "a b c", "the sky"])
    assert scores.dtype == torch.float32
    assert bool((scores.to(torch.bfloat16).float() != scores).any())


def test_kl_to_reference_is_exactly_zero_at_iteration_0_under_mixed_bf16(tmp_path):
    """Before: the reference (whole model in bf16: embeddings, norms, residual stream) and the
    policy (fp32 masters under autocast) disagreed: k1 = 0.0017 here, -0.009 on an H200. The
    decode copy keeps fp32 rotary frequencies."""
    from helpers import tiny_recipe

    from apactl.hooks import Hooks
    from apactl.metrics import read_metrics
    from apactl.workflows.align import run_align

    seen = {}
    run_align(tiny_recipe("align", tmp_path, "run.mixed_precision=bf16", "train.iterations=2"),
              hooks=Hooks(on_start=seen.update))
    rows = read_metrics(tmp_path)
    assert rows[0]["kl/ref_k1"] == 0.0 and rows[1]["kl/ref_k1"] > 0.01  # then it learns
    actors = seen["actors"]
    assert actors.sampler is not actors.policy
    assert set(_inv_freq(actors.sampler)) == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_policy_reference_sampler_identical_at_iteration_0():
    mixed = resolve_precision(RunConfig(mixed_precision="bf16"), "cuda")
    policy, tok = _policy()
    policy = policy.cuda()
    ref = mixed.store_inference(make_tiny_llama(tok, layers=2, seed=0))
    with torch.no_grad():
        ref.model.norm.weight.mul_(30.0)
    ref = ref.cuda().eval()
    sampler = mixed.decode_copy(policy)
    q, m = left_pad([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)
    resp = torch.randint(5, len(tok), (len(TEXTS), 12))
    seq = build_sequences(q.cuda(), m.cuda(), resp.cuda(), torch.ones_like(resp).cuda(),
                          tok.pad_token_id)
    spec = SamplingSpec()
    with torch.no_grad(), mixed.autocast():
        lp = [policy_forward(x, seq, resp.cuda(), spec)[0] for x in (policy, ref, sampler)]
    assert torch.equal(lp[0], lp[1]) and torch.equal(lp[0], lp[2])
    assert set(_inv_freq(sampler)) == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_align_kl_zero_at_iteration_0_with_graphs(tmp_path):
    """The CUDA default (mixed bf16, 16-bit decode copy, CUDA graphs): k1 = 0 at iteration 0
    (-0.009 on an H200 before), every iteration decoded by a graph, rotary stays fp32."""
    from helpers import tiny_recipe

    from apactl.hooks import Hooks
    from apactl.metrics import read_metrics
    from apactl.workflows.align import run_align

    seen = {}
    run_align(tiny_recipe("align", tmp_path, "train.iterations=2", "run.device=cuda"),
              hooks=Hooks(on_start=seen.update))
    rows = read_metrics(tmp_path)
    assert rows[0]["kl/ref_k1"] == 0.0, rows[0]["kl/ref_k1"]
    assert [r["gen/cuda_graph"] for r in rows] == [1.0, 1.0]
    sampler = seen["actors"].sampler
    assert set(_inv_freq(sampler)) == {torch.float32}
    assert isinstance(sampler.lm_head, Fp32Head)
