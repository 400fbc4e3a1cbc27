"""GatePro inside other people's MoE layers.

``deepspeed_gate``   a GatePro gate for ``deepspeed.moe.layer.MoE`` (``use_gatepro(moe)``)
``megatron_router``  a GatePro ``TopKRouter`` for Megatron-core and a MoE layer spec using it

Both reuse the pure functions in ``gatepro_dist.moe.routing``; importing this package imports neither
DeepSpeed nor Megatron.
"""
