"""Constrained decoding: the output follows a JSON Schema, a Lark grammar or a regex, guaranteed token by token.

- `grammar`: what a request asks for (`Grammar`), and the bounds a schema must keep, checked in plain Python
  before any library sees it (no torch, no llguidance: the API layer imports it);
- `matcher`: llguidance, the library that compiles grammars against the model's vocabulary and says which
  tokens may come next; `Constraint` is one generation's grammar state, applied as a logits processor.

Why llguidance (against xgrammar and outlines-core, measured on this project's vocabularies):
docs/constrained-decoding.md.
"""
