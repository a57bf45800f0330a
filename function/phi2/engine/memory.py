"""How much memory this execution environment has, uses, and what a request's KV cache will take.

Lambda counts a function's memory as its whole resident set, the memory-mapped weights the process touched
included, and kills the environment when it passes `MemorySize` (the runtime reports "Runtime exited with
error: signal: killed" and the request gets a 502). The engine therefore reasons in bytes before it
allocates: a request whose KV cache would not fit is refused, a cache of earlier prompts yields to the live
request. No AWS types and no torch here (Lambda's size is read from its environment variable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
# The smallest Lambda size (MB) that runs Phi-2 baked in each format (prepare_model.py --format): its peak RSS
# in `make bench` (import, load, a 512-token prompt with its fp32 KV cache) plus room for a longer request,
# rounded to a size Lambda accepts. template.yaml's MemorySize MinValue is the one of the format it bakes
# (tests/infra/test_template.py). int8 peaks at ~3.6 GiB; int4 at ~2.6 GiB and int4-mixed at ~2.8 GiB fit the
# 3,008 MB that new accounts may be capped at; bf16 safetensors at ~5.7 GiB.
PHI2_MIN_MEMORY_MB = {"int8": 4096, "int4": 3008, "int4-mixed": 3008, "safetensors": 6144}
# What a Lambda function may use: its configured size (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, in MB).
LAMBDA_MEMORY_VARIABLE = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def limit_bytes() -> int | None:
    """The memory this process may use: Lambda's configured size, else a cgroup limit, else None (unbounded)."""
    raw = os.environ.get(LAMBDA_MEMORY_VARIABLE, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw) * MIB
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        # cgroup v2 says "max", v1 a huge number, when no limit is set.
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def total_bytes() -> int | None:
    """The machine's physical memory (`MemTotal`): the bound where neither Lambda nor a cgroup sets one."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident set now (mapped weights it touched included), or None where /proc is absent."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def peak_rss_bytes() -> int | None:
    """The largest resident set this process has had (`VmHWM`)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else None


@dataclass(frozen=True)
class KvShape:
    """What one token of context costs in the KV cache: keys and values of every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int = 4
    """fp32 by default: transformers' DynamicCache holds keys and values in the model's compute dtype."""

    @classmethod
    def of(cls, config, bytes_per_value: int = 4) -> KvShape:
        """From a transformers config (Phi-2, SmolLM2 and other decoder-only models)."""
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(int(config.num_hidden_layers), kv_heads, head_dim, bytes_per_value)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value

    def bytes(self, batch: int, tokens: int) -> int:
        """The KV cache of `batch` rows of `tokens` positions each (prompt width + new tokens)."""
        return batch * tokens * self.bytes_per_token


# Admission keeps this much free beyond a request's estimate: the allocator's slack, Python objects, the
# embedding rows and kernel scratch a request touches first, and what the estimate leaves out.
ADMISSION_RESERVE_BYTES = 96 * MIB
# The quantized formats' prompt path widens weights into one buffer of this size per thread (formats/common.py):
# a long prompt may allocate it for the first time.
WIDEN_BUFFER_BYTES = 32 * MIB


@dataclass(frozen=True)
class RequestBytes:
    """What one request may need besides the loaded model, by part (bytes)."""

    kv_cache: int
    """Keys and values of every row at full length: prompt width + new tokens."""
    activations: int
    """The largest pass's: a layer's residual stream, attention scores over the context, the MLP, widened weights."""
    logits: int
    """The output head's: every position of the pass when prompt log-probabilities are asked, else one per row."""
    new_tokens: int
    per_new_token: int
    """What one more new token adds (the KV cache of every row)."""

    @property
    def total(self) -> int:
        return self.kv_cache + self.activations + self.logits


def request_bytes(
    kv: KvShape, config, batch: int, width: int, new_tokens: int, pass_rows: int, all_logits: bool = False
) -> RequestBytes:
    """The bytes of a request of `batch` rows of `width` prompt tokens and `new_tokens` new ones, whose largest
    forward pass reads `pass_rows` rows (batch x chunk tokens), in fp32 (the compute dtype of every format)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    context = width + new_tokens
    activations = pass_rows * (4 * hidden + 2 * inner + heads * context) * 4 + WIDEN_BUFFER_BYTES
    # log-softmax beside the logits: twice the logits
    logits = (pass_rows if all_logits else batch) * vocab * 4 * 2
    return RequestBytes(
        kv_cache=kv.bytes(batch, context),
        activations=activations,
        logits=logits,
        new_tokens=new_tokens,
        per_new_token=kv.bytes(batch, 1),
    )


def available_bytes(evictable: int = 0) -> tuple[int, int] | None:
    """(bytes a request may use now, the limit): the limit less the resident set (plus `evictable` bytes, such as
    cached prompt passes, that would make way) and ADMISSION_RESERVE_BYTES; None where no limit is known."""
    limit, used = limit_bytes(), rss_bytes()
    if limit is None or used is None:
        return None
    return limit - used + evictable - ADMISSION_RESERVE_BYTES, limit


def check_fits(need: RequestBytes, evictable: int = 0) -> None:
    """Refuse (MemoryLimitExceeded, a 4xx that names what would fit) a request that would push the process past
    its memory limit, where Lambda would kill the environment instead: before anything is allocated for it."""
    from phi2.errors import MemoryLimitExceeded

    room = available_bytes(evictable)
    if room is None:
        return
    available, limit = room
    if need.total <= available:
        return
    fixed = need.total - need.new_tokens * need.per_new_token
    largest = (available - fixed) // need.per_new_token if need.per_new_token else 0
    raise MemoryLimitExceeded(
        needed_bytes=need.total,
        kv_cache_bytes=need.kv_cache,
        available_bytes=max(0, available),
        limit_bytes=limit,
        largest_new_tokens=int(max(0, min(largest, need.new_tokens - 1))),
    )
