"""The OpenAI-compatible API: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Split as vLLM's `entrypoints/openai/` is: `protocol` (request, response and error bodies in OpenAI's shapes),
`serving` (a request becomes prompts, seeds and GenerationParams; a GenerationResult becomes a response),
`chat_template` (the Phi-2 prompt format), `errors` (OpenAI's error shape and status codes) and `routes`
(the Powertools Router the handler includes). Named `openai_api`, not `openai`, so that it never shadows
the SDK.
"""
