"""The image `docker build` (BuildKit) makes from the project's Dockerfile with a small model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.image

# Lambda's limit for a container image, uncompressed.
LAMBDA_IMAGE_LIMIT_BYTES = 10 * 1024**3


def test_the_image_drops_root_then_runs_the_entry_script_with_the_handler_as_command(image, engine, settings):
    # GIVEN the image built from the Dockerfile with the small model
    config = engine.client.images.get(image.tag).attrs["Config"]
    # THEN its first process is the privilege dropper handing over to the project's entry script
    assert config["Entrypoint"] == ["/usr/local/bin/drop-root.sh", "/usr/local/bin/entrypoint.sh"]
    # AND its command is the handler (what template.yaml's ImageConfig.Command replaces)
    assert config["Cmd"] == ["phi2.runtime.handler.lambda_handler"]
    # AND no USER: `sam local` builds a layer on it whose RUN needs root
    assert not config.get("User")
    # AND it says which model it bakes
    assert config["Labels"]["phi2.model-id"] == settings.model


def test_the_image_fits_lambdas_size_limit(image):
    # GIVEN the built image (its size and build time are in the report)
    # THEN it is below Lambda's 10 GB (a CUDA torch alone would take several)
    assert 0 < image.size_bytes < LAMBDA_IMAGE_LIMIT_BYTES, image.size_bytes
