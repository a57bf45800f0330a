"""The container image test (make image-test); see conftest.py."""
