"""Shared helpers of the benchmarks: hardware limits, peak memory, FLOP counting, tables.

Only the standard library and torch (imported lazily) are used, so the TRL drivers can import this
module from their own virtual environments, where apactl is not installed.

Conventions (see benchmarks/README.md):

* matmul peak: the best of ``reps`` runs of ``torch.matmul`` on two n x n matrices of the run's
  dtype, counted as 2 n^3 FLOPs, with the run's thread count.
* copy bandwidth: the best of ``reps`` runs of ``dst.copy_(src)`` on a large tensor, counted as
  2 x bytes (each byte is read once and written once) per copy: "read+write" GB/s (1 GB = 1e9 B).
* matmul parameters of a model (``matmul_params``): the weights of its ``nn.Linear`` modules (the
  LM head included even when it is tied to the input embedding; embedding look-ups, norms and
  biases excluded). Attention score FLOPs (QK^T, AV) are not counted.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ------------------------------------------------------------------------------------ limits
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_matmul_peak(threads: int | None, dtype: str = "float32", n: int = 2048,
                        reps: int = 5, device: str = "cpu") -> dict[str, float]:
    """Best-of-``reps`` GFLOP/s of an n x n x n ``torch.matmul`` (2 n^3 FLOPs)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    out = torch.empty(n, n, device=device, dtype=dt)
    torch.matmul(a, b, out=out)  # warm-up: thread pool, packing buffers
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_best_s": best,
            "matmul_gflops": 2 * n**3 / best / 1e9}


def measure_copy_bandwidth(threads: int | None, mib: int = 256, reps: int = 5,
                           device: str = "cpu") -> dict[str, float]:
    """Best-of-``reps`` copy bandwidth of a ``mib`` MiB tensor in GB/s, counting read + write."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)  # touched: no page faults timed
    dst = torch.zeros(n, dtype=torch.float32, device=device)
    dst.copy_(src)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    nbytes = n * 4
    return {"copy_mib": mib, "copy_best_s": best, "copy_gbps_rw": 2 * nbytes / best / 1e9}


def measure_limits(threads: int | None, dtype: str = "float32", matmul_n: int = 2048,
                   copy_mib: int = 256, reps: int = 5, device: str = "cpu") -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"threads": threads or torch.get_num_threads(), "device": device}
    out.update(measure_matmul_peak(threads, dtype, matmul_n, reps, device))
    out.update(measure_copy_bandwidth(threads, copy_mib, reps, device))
    return out


# ------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ru_maxrss_mib() -> float:
    """Lifetime peak resident set size of this process (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


class RssSampler:
    """A daemon thread sampling VmRSS every ``interval`` s; ``mark(name)`` opens a new window.

    ``report()`` gives the peak per window (in MiB), the lifetime ``VmHWM`` and ``ru_maxrss``.
    Sampling can miss a spike shorter than the interval; VmHWM cannot.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.windows: dict[str, float] = {}
        self.current = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def mark(self, name: str) -> None:
        self._sample()
        self.current = name

    def _sample(self) -> None:
        kib = _status_kib("VmRSS")
        if kib is not None:
            mib = kib / 1024
            self.windows[self.current] = max(self.windows.get(self.current, 0.0), mib)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._sample()
        self._stop.set()
        self._thread.join(timeout=1.0)

    def report(self) -> dict[str, Any]:
        hwm = _status_kib("VmHWM")
        return {"ru_maxrss_mib": ru_maxrss_mib(),
                "vmhwm_mib": hwm / 1024 if hwm is not None else None,
                "sampled_peak_mib_by_window": dict(self.windows)}


# ------------------------------------------------------------------------------------- FLOPs
_INDEX = re.compile(r"\.(\d+)\.")


def _depth(name: str, n_layers: int) -> float:
    """Where a module sits from input to output: its decoder layer index; input embeddings at
    -1; anything outside the layer stack (LM head, score head, final norm) on top."""
    m = _INDEX.search("." + name + ".")
    if m:
        return int(m.group(1))
    if "embed" in name or "wte" in name or "wpe" in name:
        return -1
    return n_layers


def matmul_params(model) -> dict[str, int]:
    """Parameter counts of a model for FLOP accounting.

    * ``total``: every parameter, tied tensors once (the simple 6N convention uses this).
    * ``fwd``: weights of the ``nn.Linear`` modules (the matmuls of one forward per token); a tied
      LM head counts here (it is a V x H matmul) although it shares the embedding tensor.
    * ``bp``: the part of ``fwd`` the backward pass must go through to reach a trainable
      parameter (input gradients): the Linear weights at or above the lowest trainable layer.
    * ``train``: Linear weights that require grad (their weight gradients).
    * ``weight_bytes``: bytes of all parameters (tied once): what one decoding step reads.
    """
    import torch

    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    depths = [_depth(n, 0) for n, _ in model.named_modules()]
    n_layers = max([d for d in depths if d >= 0] or [0]) + 1
    trainable_depths = [_depth(n.rsplit(".", 1)[0], n_layers)
                        for n, p in model.named_parameters() if p.requires_grad]
    lowest = min(trainable_depths) if trainable_depths else math.inf
    fwd = bp = train = 0
    for name, lin in named:
        k = lin.weight.numel()
        fwd += k
        if _depth(name, n_layers) >= lowest:
            bp += k
        if lin.weight.requires_grad:
            train += k
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"total": total, "trainable": n_trainable, "fwd": fwd, "bp": bp, "train": train,
            "weight_bytes": weight_bytes}


def kv_bytes_per_token(config, elem: int = 2) -> int:
    """Bytes of K and V one token occupies in a KV cache (every layer), ``elem`` bytes each:
    what a decode step reads per cached token (16-bit K/V under autocast: 2)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv * head_dim * elem


def decode_read_bytes(weight_bytes: int, kv_per_token: int, rows: int, steps: int,
                      cache_len: int | None, prompt_len: int) -> int:
    """Bytes one decode call of ``steps`` steps reads: the decode model's weights every step,
    plus the KV cache attended: all ``cache_len`` slots of a static cache (CUDA graph path;
    ``rows`` = its bucketed row count), or the growing prompt + t tokens of the plain loop
    (``cache_len`` None)."""
    if cache_len is not None:
        kv = steps * rows * cache_len * kv_per_token
    else:
        kv = rows * kv_per_token * sum(prompt_len + t for t in range(steps))
    return steps * weight_bytes + kv


def train_flops_per_token(p: dict[str, int]) -> dict[str, int]:
    """Forward + backward FLOPs per token of one model under both conventions.

    primary ("trainable-aware"): 2 fwd (forward) + 2 bp (input gradients down to the lowest
    trainable layer) + 2 train (weight gradients) -- equals 6 x fwd when everything trains.
    simple ("6N"): 6 x total parameters, frozen or not.
    """
    return {"primary": 2 * p["fwd"] + 2 * p["bp"] + 2 * p["train"], "simple_6n": 6 * p["total"]}


# ------------------------------------------------------------------------------- processes
def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_json(cmd: Sequence[str], threads: int, log: Path | None = None,
             json_path: Path | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run a benchmark process with ``threads`` threads; its result is the JSON file
    ``json_path`` or, without one, the last line of its stdout. stderr goes to ``log``.
    Raises RuntimeError with the log's tail on failure."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as err:
        proc = subprocess.run(list(cmd), cwd=cwd, env=thread_env(threads), text=True,
                              stdout=subprocess.PIPE, stderr=err, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not (lines or json_path):
        tail = Path(log).read_text()[-3000:] if log and Path(log).exists() else ""
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}\n{tail}")
    if json_path is not None:
        return json.loads(Path(json_path).read_text())
    return json.loads(lines[-1])


def mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return p


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return str(v)
