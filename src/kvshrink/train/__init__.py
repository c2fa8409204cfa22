"""Training: the DMS retrofit (distillation with a ramped compression target)."""
