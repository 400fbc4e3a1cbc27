"""Real gloo process groups for tests (no mocks): see gatepro_dist.cluster.spawn."""
from gatepro_dist.cluster.spawn import run_on_ranks  # noqa: F401
