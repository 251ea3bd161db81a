"""Fixtures of the e2e tests."""

from tests.e2e.cluster import cluster  # noqa: F401  (the fixture)
