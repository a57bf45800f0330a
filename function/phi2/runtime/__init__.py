"""The Lambda runtime: the handler (`phi2.runtime.handler.lambda_handler`), the streaming Runtime API loop
(`python -m phi2.runtime.stream_runtime`), the invocation (deadline, request id) and observability."""
