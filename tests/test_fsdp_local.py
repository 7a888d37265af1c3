"""FSDP in one process (a gloo group of one): the sampler refresh from a sharded policy, and
``run.strategy: fsdp`` on a single device (so one GPU can run and measure it)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from helpers import tiny_recipe

from apactl.testing import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture
def group_of_one():
    td = torch.distributed
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    yield
    td.destroy_process_group()


def sharded_policy_and_replica():
    from apactl.fsdp import shard_model

    tok = make_tiny_tokenizer()
    policy = make_tiny_llama(tok, hidden=32, layers=3, seed=0)
    policy.config.tie_word_embeddings = True
    policy.tie_weights()
    replica = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)
    shard_model(policy)
    with torch.no_grad():  # an update: the replica is now stale
        for p in policy.parameters():
            p.add_(0.01)
    return policy, replica


def test_sampler_refresh_gathers_one_parameter_at_a_time(group_of_one, monkeypatch):
    """Before: the whole policy's unsharded state dict on every rank at once (28 GB at 7B)
    and load_state_dict(strict=False). Now each parameter is gathered, copied and dropped."""
    from torch.distributed.tensor import DTensor

    from apactl.rl.rollout import Actors

    policy, replica = sharded_policy_and_replica()
    alive, peak, gathered = weakref.WeakSet(), [0], []
    real = DTensor.full_tensor

    def full_tensor(self, *a, **kw):
        out = real(self, *a, **kw)
        alive.add(out)
        gathered.append(out.numel())
        peak[0] = max(peak[0], sum(t.numel() for t in alive))
        return out

    monkeypatch.setattr(DTensor, "full_tensor", full_tensor)
    actors = Actors(policy, None, None, None, None, [], torch.device("cpu"), None,
                    sampler=replica, sharded=True)
    actors.sync_sampler()
    n_params = len(list(policy.parameters()))
    assert len(gathered) == n_params  # every parameter, once (the tied head with the embedding)
    assert peak[0] == max(gathered)  # never more than one unsharded parameter at a time
    for name, p in policy.named_parameters():
        want = p.full_tensor().to(torch.bfloat16)
        assert torch.equal(dict(replica.named_parameters())[name], want), name


def test_sampler_refresh_refuses_a_key_mismatch(group_of_one):
    from apactl.fsdp import copy_to_replica

    policy, replica = sharded_policy_and_replica()
    replica.model.layers[0].self_attn.register_parameter(
        "extra", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(RuntimeError, match=r"unexpected \['model.layers.0.self_attn.extra'\]"):
        copy_to_replica(policy, replica)
    policy2, replica2 = sharded_policy_and_replica()
    del replica2.model.norm.weight
    with pytest.raises(RuntimeError, match=r"missing \['model.norm.weight'\]"):
        copy_to_replica(policy2, replica2)


def test_fsdp_joins_a_group_of_one(tmp_path):
    """run.strategy=fsdp in a single process: a process group of one is made, so the loops
    shard (before, FSDP was silently off at world size 1)."""
    from apactl.runtime import setup_run

    td = torch.distributed
    try:
        with setup_run(tiny_recipe("sft", tmp_path / "run", "run.strategy=fsdp")) as rt:
            assert td.is_initialized() and td.get_world_size() == 1
            assert rt.dist.joined and not rt.dist.enabled
            assert rt.dist.device == torch.device("cpu") and rt.dist.objects is None
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def test_rm_eval_runs_as_many_forwards_on_every_rank(monkeypatch):
    # Under fsdp a forward is a collective: 5 held-out pairs over 2 ranks (3 and 2) in batches
    # of 2 must still be 2 forwards on each rank, or the job hangs in evaluation.
    import torch

    from apactl.distributed import Dist
    from apactl.workflows import rm

    calls = []

    def scores(model, batch):
        calls.append(len(batch))
        return torch.zeros(len(batch)), torch.ones(len(batch))

    class Rank(Dist):
        def __init__(self, rank):
            self._rank = rank

        rank = property(lambda self: self._rank)
        world_size = property(lambda self: 2)

        def unshard(self, mine):
            return mine

    monkeypatch.setattr(rm, "pair_scores", scores)
    items = [{"chosen_ids": [1] * (i + 1), "rejected_ids": [2]} for i in range(5)]
    per_rank = []
    for r in (0, 1):
        calls.clear()
        out = rm.rm_eval(None, items, lambda part: part, 2, 0.0, Rank(r))
        per_rank.append(len(calls))
        assert out["eval/pairs"] == len(items[r::2])  # a filler forward adds no pair
    assert per_rank == [2, 2]
