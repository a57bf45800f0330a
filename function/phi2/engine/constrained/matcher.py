"""llguidance behind the engine: grammars compiled against the model's vocabulary, and one generation's grammar
state applied as a logits processor.

- `GrammarCompiler` (one per loaded model) holds llguidance's view of the tokenizer, built on the first
  constrained request (about 0.5 s for Phi-2's or SmolLM2's vocabulary: paid once per execution environment, not
  at every cold start) and the compiled grammars of recent requests (a schema sent again costs nothing). Every
  compile runs under explicit limits (LIMITS, llguidance's own: Python cannot interrupt a compiling thread), and
  a grammar the library refuses becomes an InvalidGrammar that names the request field. Compiles run on one
  worker thread with a COMPILE_STACK_BYTES stack: llguidance recurses through a grammar's rules, and a chain of
  ~2,500 rules or `$ref`s (a few kilobytes of request) overflowed the main thread's 8 MB and killed the process
  with SIGSEGV; on the worker, anything the request size allows compiles (or is refused) and the model lives.
- `Constraint` is one `generate` call's grammar state: a matcher per row. As a logits processor it masks every
  token the grammar does not allow next (the padding ids past the tokenizer, 50,295..51,199 for Phi-2, always;
  the end of text only where the grammar accepts); `advance` moves a row's matcher with the token that row
  actually chose, and is called by the stopping criterion (hooks.Steps), which knows each row's token and which
  rows are finished. A grammar that can take nothing more ends its row there (no step is spent on the end of
  text). A matcher that exceeds the library's per-token limits mid-generation (a pattern whose automaton
  explodes) ends the request with InvalidGrammar `grammar_too_complex`.

The mask is applied with plain torch ops (sampling.apply_token_bitmask): llguidance's own torch helper is
`torch.compile`d, and the runtime image has no compiler.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from transformers import LogitsProcessor

from phi2.engine.constrained.grammar import JSON_OPTIONS, Grammar
from phi2.engine.sampling import apply_token_bitmask
from phi2.errors import InvalidGrammar

log = logging.getLogger(__name__)

CACHE_SIZE = 64
"""Compiled grammars kept per model (the template matcher of each; a request copies it per row)."""
LIMITS = {
    # llguidance's defaults, written out so that the bounds are ours to read and change. Measured here
    # (docs/constrained-decoding.md): the lexer's fuel bounds a compile to tens of milliseconds and a mask to
    # ~15 ms; an enum of 100,000 values exhausts the initial fuel in 0.4 s (grammar.py's bounds refuse it first).
    "max_items_in_row": 2000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
    # Errors name the problem without the parser's state (which quotes generated text).
    "verbose_errors": False,
}
MAX_ERROR_CHARS = 300
COMPILE_STACK_BYTES = 256 * 1024 * 1024
"""The compile worker's stack: 32 times the main thread's, past what a request's 128 KB can nest (address space
only: pages are touched as the recursion goes)."""


def _message(error: str) -> str:
    """The library's error, first line, without the parser state it may quote."""
    first = error.strip().split("\n<state>")[0].replace("<non-verbose/>", "").strip().splitlines()
    text = " ".join(line.strip() for line in first[:3] if line.strip())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


class GrammarCompiler:
    """Grammars compiled against one model's vocabulary (`vocab_size` logits, of which the tokenizer's ids are the
    first `len(tokenizer)`; `eos_ids` end the text)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self._tokenizer = None
        self._cache: OrderedDict[Grammar, object] = OrderedDict()
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None

    def _on_worker(self, work: Callable[[], object]) -> object:
        """Run `work` on the compile worker (started on first use, with its large stack) and wait for it."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            previous = threading.stack_size(COMPILE_STACK_BYTES)
            try:
                threading.Thread(target=self._serve, args=(self._jobs,), name="grammar-compiler", daemon=True).start()
            finally:
                threading.stack_size(previous)
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((work, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            work, done = jobs.get()
            try:
                done.put((True, work()))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which raises it
                done.put((False, exc))

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            began = time.monotonic()
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids
            )
            log.info("constrained decoding ready", extra={"seconds": round(time.monotonic() - began, 3)})
        return self._tokenizer

    def compile(self, grammar: Grammar):
        """The template matcher of `grammar` (copy it per row), or InvalidGrammar naming the problem."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is None:
                cached = self._on_worker(lambda: self._compile(grammar))
                self._cache[grammar] = cached
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(grammar)
        if isinstance(cached, str):  # a refusal is remembered too: the same bad schema is answered at once
            raise InvalidGrammar(cached, param=grammar.origin, code=grammar.error_code)
        return cached

    def _compile(self, grammar: Grammar):
        import llguidance

        tokenizer = self._llg_tokenizer()
        try:
            if grammar.kind == "json_schema":
                text = llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults=JSON_OPTIONS)
            elif grammar.kind == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(grammar.source)
            else:
                text = llguidance.LLMatcher.grammar_from_lark(grammar.source)
        except ValueError as exc:
            return f"{grammar.origin}: {_message(str(exc))}"
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
        if matcher.is_error():
            return f"{grammar.origin}: {_message(matcher.get_error())}"
        return matcher

    def constraint(self, grammar: Grammar, rows: int) -> Constraint:
        return Constraint(self.compile(grammar), grammar, rows, self.vocab_size, on_error=self.forget)

    def forget(self, grammar: Grammar) -> None:
        """Drop a compiled grammar: the copies of a template share its lexer, so one that exceeded the library's
        limits would fail every later request at once (the next one compiles it afresh)."""
        with self._lock:
            self._cache.pop(grammar, None)


class Constraint(LogitsProcessor):
    """One generation's grammar state: a matcher per row, masking the logits before any sampling control."""

    def __init__(
        self, template, grammar: Grammar, rows: int, vocab_size: int, on_error: Callable[[Grammar], None] | None = None
    ) -> None:
        self.grammar = grammar
        self.on_error = on_error
        self.matchers = [template.deep_copy() for _ in range(rows)]
        self.active = [True] * rows
        self.tokens = [0] * rows
        self.bitmask = torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.seconds = 0.0
        """Time spent computing and applying masks."""
        self.row_masks = 0
        """Masks computed (one per active row per step)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        began = time.perf_counter()
        size = self.bitmask.shape[1] * 4
        for row, matcher in enumerate(self.matchers):
            target = self.bitmask[row]
            if not self.active[row]:
                target.fill_(-1)  # a finished row's scores are not used: transformers pads it
                continue
            matcher.unsafe_compute_mask_ptr(target.data_ptr(), size)
            if matcher.is_error():
                if self.on_error is not None:
                    self.on_error(self.grammar)
                raise InvalidGrammar(
                    f"{self.grammar.origin}: after {self.tokens[row]} generated tokens the constraint grew too "
                    f"complex to follow ({_message(matcher.get_error())}); simplify its patterns",
                    param=self.grammar.origin,
                    code="grammar_too_complex",
                )
            self.row_masks += 1
        scores = apply_token_bitmask(scores, self.bitmask)
        self.seconds += time.perf_counter() - began
        return scores

    def advance(self, row: int, token: int) -> bool:
        """Move row `row`'s matcher with the token it chose; True when the grammar can take nothing more (the row
        is complete: its end of text would be the only token allowed)."""
        matcher = self.matchers[row]
        if not matcher.consume_token(token):
            # The mask allowed only what the grammar allows: a refusal here is a bug, not the caller's input.
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: {matcher.get_error()}")
        self.tokens[row] += 1
        return matcher.is_stopped()

    def end(self, row: int) -> None:
        """Row `row` is finished: no more masks for it."""
        self.active[row] = False

    def complete(self, row: int) -> bool:
        """Whether row `row`'s output so far is a whole sentence of the grammar (the JSON is complete)."""
        matcher = self.matchers[row]
        return matcher.is_accepting() and not matcher.is_error()

    @property
    def seconds_per_row_mask(self) -> float | None:
        return self.seconds / self.row_masks if self.row_masks else None
