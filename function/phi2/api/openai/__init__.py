"""The OpenAI-compatible API: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Split as vLLM's `entrypoints/openai/` is: `protocol` (request, response and error bodies in OpenAI's shapes),
`serving` (a request becomes prompts, seeds and GenerationParams; a GenerationResult becomes a response),
`chat_template` (the Phi-2 prompt format), `errors` (OpenAI's error shape and status codes) and `routes`
(the Powertools Router the handler includes). It is `phi2.api.openai`: always imported by that full name, it
never shadows the SDK (`import openai`), since no directory inside `phi2` is ever on `sys.path`.
"""
