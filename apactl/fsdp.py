"""Fully sharded data parallel for ``apactl sft``, ``rm`` and ``align`` (``run.strategy: fsdp``,
torch FSDP2).

Each decoder layer and then the whole model go through ``fully_shard``: every rank keeps 1/N of
the weights, gradients and AdamW state (ZeRO-3), gathers a layer's weights for its forward and
backward, and reduce-scatters (averages) the gradients. The arithmetic is that of ddp (the same
micro-batches, the same averaged gradient before clipping); checkpoints hold the full, unsharded
state in the ddp format (optimizer state keyed by parameter index), so a run resumes with either
strategy on any world size.
"""

from __future__ import annotations

from typing import Any

import torch


def shard_model(model: torch.nn.Module, precision=None) -> torch.nn.Module:
    """Shard per decoder layer, then the rest. A sequence classifier (a reward model) is scored
    through its backbone and its ``score`` head called one after the other
    (``models.sequence_scores``), which skips the root module's forward: the backbone and the
    head are units of their own, so each gathers its weights when it is called. A causal LM
    keeps its embeddings in the root unit (the LM head is tied to them)."""
    from functools import partial

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from apactl.models import backbone, decoder_layers, unwrap

    shard = fully_shard
    if precision is not None and precision.mixed and precision.device.type == "cuda":
        # FSDP's own mixed precision: all-gather the weights in the compute dtype (half the
        # traffic of fp32), reduce-scatter gradients in fp32 into the fp32 shards.
        shard = partial(fully_shard, mp_policy=MixedPrecisionPolicy(
            param_dtype=precision.dtype, reduce_dtype=torch.float32))
    for layer in decoder_layers(model):
        shard(layer)
    head = getattr(unwrap(model), "score", None)
    if head is not None:
        shard(backbone(model))
        shard(head)
    shard(model)  # the rest: embeddings (tied to the LM head), final norm, head
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the optimizer's parameters, in its order (``make_optimizer`` uses this order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_state(model: torch.nn.Module, opt=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state dict, index-keyed optimizer state dict), unsharded on rank 0's CPU; empty
    dicts on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from apactl.checkpoint import is_tied

    msd = get_model_state_dict(model, options=_options(cpu_offload=True))
    # Like save_pretrained: a tied LM head is the embedding matrix, stored once.
    msd = {k: v for k, v in msd.items() if not is_tied(model, k)}
    if opt is None:  # the final model: weights only
        return msd, {}
    osd = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if not msd:
        return {}, {}
    index = {n: i for i, n in enumerate(trainable_names(model))}
    return msd, {
        "state": {index[k]: v for k, v in osd["state"].items() if k in index},
        "param_groups": [{**g, "params": [index[n] for n in g["params"] if n in index]}
                         for g in osd["param_groups"]],
    }


def load_optimizer(model: torch.nn.Module, opt, state: dict[str, Any]) -> None:
    """Load a full index-keyed optimizer state (every rank read the checkpoint) into ``opt``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = trainable_names(model)
    osd = {"state": {names[i]: v for i, v in state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                            for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, osd, options=_options())



def copy_to_replica(model: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Copy a sharded ``model``'s weights into ``replica``, an unsharded local copy of it (the
    sampler), in place, one parameter at a time: each is all-gathered, copied (cast to the
    replica's dtype) and dropped, so a rank never holds more than one unsharded parameter
    besides the replica (not the whole fp32 model). A collective: every rank calls it, and
    visits the parameters in the same order.

    The names must match exactly, a tied LM head excepted (one side may list it, the other
    not): a replica that silently missed a weight would decode from stale weights forever.
    """
    from torch.distributed.tensor import DTensor

    from apactl.checkpoint import is_tied

    src, dst = dict(model.named_parameters()), dict(replica.named_parameters())
    missing = sorted(k for k in src.keys() - dst.keys() if not is_tied(model, k))
    unexpected = sorted(k for k in dst.keys() - src.keys() if not is_tied(replica, k))
    if missing or unexpected:
        raise RuntimeError(f"the sampler copy does not match the policy: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, p in src.items():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if name in dst:
                dst[name].copy_(full)
            del full


def load_full_weights(model: torch.nn.Module, folder) -> None:
    """Load a saved model folder (safetensors, unsharded) into a sharded ``model``; every rank
    reads the files. A tied LM head is not in the files and stays tied."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from apactl.checkpoint import read_weights

    set_model_state_dict(model, read_weights(folder), options=_options(strict=False))
