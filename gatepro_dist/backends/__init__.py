"""Training engines other than the native loop (``train.backend``).

``deepspeed_config``  the DeepSpeed JSON generated from our YAML (pure; no torch, no deepspeed)
``deepspeed_trainer`` the same model and data on a DeepSpeed engine (ZeRO 0/1/2, optional bf16)

Importing this package imports neither torch nor deepspeed; ``train.engine.train`` dispatches here when
``train.backend=deepspeed``.
"""
