"""Where a job runs: launcher environment, rendezvous, preemption, health checks, fault injection."""
