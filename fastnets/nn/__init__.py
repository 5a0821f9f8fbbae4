"""Drop-in modules: same constructor arguments and state_dict keys as their torch.nn counterparts,
and fused modules that keep the state_dict keys of the stock sequence they replace."""
# One import line per op family, sorted.
