"""Training: the per-stage LightningModules, parallelism (FSDP2, AC, compile) and the memory planner."""
