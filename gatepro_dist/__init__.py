"""gatepro_dist: expert-parallel Mixture-of-Experts training with the GatePro router."""
__version__ = "0.1.0"
