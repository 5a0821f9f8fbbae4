"""The public functional API. Mirrors torch.nn.functional where a counterpart exists (same
argument names and defaults) and adds the fused ops. Each op family lives in fastnets/ops/."""
# One import line per op family, sorted.
