"""The data path moved to ``gatepro_dist/data/`` (sources, tokenization, mixing, the batch); this name
stays so that existing imports (``from gatepro_dist.train.data import build_data``) keep working."""
from ..data import *  # noqa: F401,F403
from ..data import __all__  # noqa: F401
