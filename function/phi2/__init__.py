"""Phi-2 text generation on AWS Lambda."""
