"""A warm environment remembers: the KV caches of earlier requests, per caller, reused by the next request
that starts with the same tokens.

A chat client sends the whole conversation every turn; without this, every turn reads it again from the
first token. After a request, its KV cache (transformers' DynamicCache: the prompt and the generated tokens
that were fed back) is kept here, keyed by the token ids it holds and by the caller's scope. The next request
of the same scope reuses the longest cached prefix of its own tokens, and the prompt pass reads only the rest.

- **Per scope.** An entry is reused only by a request of the same scope (the caller's identity, narrowed by
  OpenAI's `prompt_cache_key`; see phi2.runtime.invocation.cache_scope). No scope, no reuse and nothing kept:
  a tenant must not learn from its time to first token what another tenant's prompt held.
- **In bytes.** The stored tensors are counted by their storage. The budget is what the function's memory
  (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, else the cgroup's limit, else the machine's) leaves after what the
  process uses besides this cache (the model, the runtime), a reserve, and the live request's working set
  (its KV cache at full length and one pass's activations): before every request the least recently used
  entries are dropped until the live request fits, so it always wins. Where there is no room at all (a
  3,008 MB function serving Phi-2) the cache is off.
- **For a while.** An entry unused for `ttl_s` is never reused and is dropped at the next request (a frozen
  environment runs no code, so nothing is dropped while frozen; nothing expired is ever used).
- **Moved, not copied.** A request that reuses most of an entry takes it over (cropped to the shared prefix:
  `DynamicCache.crop`), so a conversation's cache exists once; a short shared prefix (a system prompt that
  several conversations share) is copied and the entry stays.

Rows of a left-padded batch sit at shifted positions, so only single-prompt requests (batch 1, or `n` rows
of one prompt) use this; the generator decides. No AWS types here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from phi2.engine import memory

log = logging.getLogger(__name__)

MIB = memory.MIB
# Kept free besides the budget: allocator slack, Python objects, the response. A share of the limit, at least this.
RESERVE_BYTES = 256 * MIB
RESERVE_FRACTION = 0.05
# Below this much room (in tokens of one row's KV cache) the cache is off: entries would be evicted before reuse.
MIN_ROOM_TOKENS = 256
# A request that reuses at least this share of an entry takes it over; below it, it copies the prefix it needs.
MOVE_FRACTION = 0.5
DEFAULT_TTL_S = 600.0


@dataclass
class Entry:
    scope: Hashable
    ids: torch.Tensor
    """The token ids (1-D, int64) whose keys and values `cache` holds, one row."""
    cache: DynamicCache
    bytes: int
    used_at: float


@dataclass(frozen=True)
class Reuse:
    """A cached prefix handed to the live request: its KV cache (one row, `tokens` positions)."""

    cache: DynamicCache
    tokens: int
    moved: bool = True
    """Taken over from the cache (give it back if the request does not run); False: a copy, the entry stays."""


@dataclass
class Stats:
    """What the cache did since the environment started (the hit rate the docs and the bench report)."""

    lookups: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of every lookup."""
    reused_tokens: int = 0
    """Of those, the ones whose keys and values came from the cache."""
    stored: int = 0
    peak_bytes: int = 0
    """The most the entries held at once."""
    evicted: dict[str, int] = field(default_factory=lambda: {"memory": 0, "ttl": 0, "replaced": 0})


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the tensors a cache holds, counted by their storage (a cropped view still holds its whole storage)."""
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cache_rows(cache: DynamicCache) -> int:
    """Rows (batch size) a cache holds; 0 before its first pass."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return keys.shape[0]
    return 0


def compact(cache: DynamicCache) -> None:
    """Give back what crops left behind: a layer whose storage is larger than its view is copied to its size."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > tensor.nbytes:
                setattr(layer, name, tensor.clone())


def copy_prefix(cache: DynamicCache, tokens: int, config) -> DynamicCache:
    """A new cache with the first `tokens` positions of `cache` (the library copies them in)."""
    data = [(layer.keys[..., :tokens, :], layer.values[..., :tokens, :]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=data, config=config)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


class PrefixCache:
    """The cached prompt passes of one execution environment (one request at a time, as Lambda runs them)."""

    def __init__(
        self,
        kv: memory.KvShape,
        config,
        *,
        max_bytes: int | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        limit_bytes: int | None = None,
        used_bytes: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.config = config
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.limit_bytes = limit_bytes
        self.used_bytes = used_bytes or (lambda: memory.rss_bytes())
        self.clock = clock
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self.stats = Stats()
        self.off_reason: str | None = None

    @classmethod
    def for_model(
        cls, kv: memory.KvShape, config, context_length: int, *, max_mb: int | None = None, ttl_s: float = DEFAULT_TTL_S
    ) -> PrefixCache:
        """The cache of a loaded model, sized from this environment's memory (call after the warm-up, when the
        process's resident set holds the model as it serves)."""
        limit = memory.limit_bytes() or memory.total_bytes()
        cache = cls(kv, config, max_bytes=None if max_mb is None else max_mb * MIB, ttl_s=ttl_s, limit_bytes=limit)
        room = cache.budget(kv.bytes(1, context_length))
        if room < kv.bytes(1, MIN_ROOM_TOKENS):
            cache.off_reason = (
                f"no room: {room // MIB} MiB left of {(limit or 0) // MIB} MiB after the model and one "
                f"{context_length}-token request; at least {kv.bytes(1, MIN_ROOM_TOKENS) // MIB} MiB needed"
            )
        return cache

    # -- size ----------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.off_reason is None

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries.values())

    def reserve_bytes(self) -> int:
        return max(RESERVE_BYTES, int(RESERVE_FRACTION * (self.limit_bytes or 0)))

    def budget(self, live_bytes: int) -> int:
        """Bytes the entries may hold while a request of `live_bytes` runs: the memory limit less what the process
        uses besides the entries, the reserve and the live request; never above `max_bytes`."""
        budget = self.max_bytes if self.max_bytes is not None else 2**62
        used = self.used_bytes() if self.limit_bytes is not None else None
        if self.limit_bytes is not None and used is not None:
            others = max(0, used - self.bytes)
            budget = min(budget, self.limit_bytes - others - self.reserve_bytes() - live_bytes)
        return max(0, budget)

    def make_room(self, live_bytes: int) -> None:
        """Before a request: drop expired entries, then the least recently used until the live request fits."""
        self._expire()
        self._shrink(self.budget(live_bytes))

    def _shrink(self, budget: int) -> None:
        total = self.bytes
        while self.entries and total > budget:
            _, entry = self.entries.popitem(last=False)
            total -= entry.bytes
            self.stats.evicted["memory"] += 1

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self.entries.items() if now - e.used_at > self.ttl_s]:
            del self.entries[key]
            self.stats.evicted["ttl"] += 1

    # -- use -----------------------------------------------------------------------------------------

    def take(self, scope: Hashable, ids: torch.Tensor) -> Reuse | None:
        """The longest cached prefix of `ids` (1-D) for `scope`, at most all but the last token (the model must
        read at least one token to predict the next); None when nothing is shared."""
        if not self.enabled:
            return None
        self._expire()
        self.stats.lookups += 1
        self.stats.prompt_tokens += ids.numel()
        best, shared = None, 0
        for key, entry in self.entries.items():
            if entry.scope == scope:
                common = _common_prefix(entry.ids, ids)
                if common > shared:
                    best, shared = key, common
        tokens = min(shared, ids.numel() - 1)
        if best is None or tokens <= 0:
            return None
        entry = self.entries[best]
        length = entry.ids.numel()
        if tokens >= MOVE_FRACTION * length:
            del self.entries[best]
            cache = entry.cache
            if tokens < length:
                cache.crop(tokens - length)
        else:
            cache = copy_prefix(entry.cache, tokens, self.config)
            entry.used_at = self.clock()
            self.entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.reused_tokens += tokens
        return Reuse(cache, tokens, moved=cache is entry.cache)

    def put(self, scope: Hashable, ids: torch.Tensor, cache: DynamicCache) -> bool:
        """Keep `cache` (one row holding exactly `ids`) for `scope`, if it fits; True if kept."""
        if not self.enabled or scope is None or ids.numel() == 0:
            return False
        if not cache.is_croppable or cache.get_seq_length() != ids.numel() or cache_rows(cache) != 1:
            return False
        compact(cache)
        size = cache_bytes(cache)
        # An entry of this scope that the new one extends is redundant: the new one answers every lookup it would.
        for key in [k for k, e in self.entries.items() if e.scope == scope and _is_prefix(e.ids, ids)]:
            del self.entries[key]
            self.stats.evicted["replaced"] += 1
        budget = self.budget(0)
        if size > budget:
            self._shrink(budget)
            return False
        self._next += 1
        self.entries[self._next] = Entry(scope, ids.clone(), cache, size, self.clock())
        self.stats.stored += 1
        self._shrink(budget)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
        return True

    def clear(self) -> None:
        self.entries.clear()

    def describe(self) -> dict[str, object]:
        """For logs and the benchmark: size, budget and what was reused."""
        s = self.stats
        return {
            "enabled": self.enabled,
            "off_reason": self.off_reason,
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "ttl_s": self.ttl_s,
            "lookups": s.lookups,
            "hits": s.hits,
            "hit_rate": round(s.hits / s.lookups, 3) if s.lookups else None,
            "reused_token_share": round(s.reused_tokens / s.prompt_tokens, 3) if s.prompt_tokens else None,
            "peak_bytes": s.peak_bytes,
            "evicted": dict(s.evicted),
        }


def _is_prefix(short: torch.Tensor, long: torch.Tensor) -> bool:
    return short.numel() <= long.numel() and bool(torch.equal(short, long[: short.numel()]))
