"""The one sampling path of align, eval and label.

* ``SamplingSpec``: the distribution responses are drawn from (temperature, top-k, top-p) and
  the one place that turns logits into the log-probs and entropy of that distribution.
* ``sample``: draw responses for left-padded prompts with the backend chosen for the device
  (``backend="auto"``): on CPU apactl's KV-cache loop with weight-major matmuls, on CUDA a static
  cache replayed as a CUDA graph; ``"transformers"``: ``model.generate``. Every backend draws
  the same distribution (tests compare the tokens).
* ``seeded_chunks``: a global list of work cut into chunks, chunk j seeded from
  (run seed, stream, key..., j) and run by rank j % world_size; results gathered in order on
  every rank. Samples therefore do not depend on the world size and resume exactly.
"""

from apactl.sampling.chunks import Stream, chunk_seed, seeded_chunks
from apactl.sampling.spec import SamplingSpec, eos_ids, response_mask, sample, used_cuda_graph
from apactl.sampling.static import release_decode_memory

__all__ = ["SamplingSpec", "Stream", "chunk_seed", "eos_ids", "release_decode_memory",
           "response_mask", "sample",
           "seeded_chunks", "used_cuda_graph"]
