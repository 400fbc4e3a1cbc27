"""The path of one token: router -> dispatch -> experts -> combine.

    routing.py   GatePro and top-k as pure functions
    router.py    the router module: sharded rows, all-gather, where GatePro decides
    dispatch.py  count exchange, permute, all-to-all (where tokens cross ranks), combine
    experts.py   SwiGLU experts, grouped GEMM (where experts compute)
    layer.py     MoELayer: the four together, with per-call statistics
    comm.py, comm_model.py  the collectives the path uses and their predicted bytes
"""
from .layer import MoELayer, MoESpec, MoEStats

__all__ = ["MoELayer", "MoESpec", "MoEStats"]
