"""Real gloo process groups for tests (no mocks): see gatepro_dist.spawn."""
from gatepro_dist.spawn import run_on_ranks  # noqa: F401
