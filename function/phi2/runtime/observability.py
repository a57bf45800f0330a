"""The Powertools logger, metrics and tracer of this function: one of each, shared by every module.

Nothing the caller wrote or the model generated goes into any of them unless `LOG_TEXT=true`: tracing
decorators here never capture return values or exceptions (both can carry prompts).
"""

from __future__ import annotations

import warnings

from aws_lambda_powertools import Logger, Metrics, Tracer

from phi2.settings import get_settings

# Health checks and rejected requests publish no metrics; that is expected, not worth a warning each.
warnings.filterwarnings("ignore", message="No application metrics to publish")

settings = get_settings()
logger = Logger(service=settings.service_name)
metrics = Metrics(namespace=settings.metrics_namespace, service=settings.service_name)
tracer = Tracer(service=settings.service_name)
