"""The sections of ``gatepro-bench gpu``, one module each; every section is a function
``run(options, note) -> dict`` that ``gpu_child`` calls in its own process (``gpu.SECTIONS`` lists them
in the order they run). The checks themselves take a device and run on a CPU too, at small sizes,
which is how tests/test_gpu_bench.py tests them; the sections insist on CUDA.

    env          versions: GPU, driver, CUDA, NCCL, cuBLAS, cuDNN, torch (env.py)
    collectives  the collectives our code calls, on the trainer's cpu:gloo,cuda:nccl group (collectives.py)
    sync_debug   one MoE layer fwd+bwd under torch.cuda.set_sync_debug_mode("error") (sync_debug.py)
    numerics     bf16 against fp32 (TF32 off): uniform, skewed with empty experts, capacity (numerics.py)
    resume       stop at step 10 with a checkpoint, resume to 15 in a new process, against 15 in one go (training.py)
    timing       grouped GEMMs, our layer (fp32 and bf16 parameters), Megatron's MoELayer (timing.py)
    fsdp         parallel.dp_shard's FSDP2 path on one GPU, and its checkpoint round trip (training.py)
    megatron_check  integrations/megatron_gpu_check.py (megatron.py)
    tests        the device-aware pytest files on CUDA (device_tests.py)
"""
