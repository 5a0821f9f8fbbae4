"""What committed GPU runs measured: the table `auto` dispatch reads (fastnets/_dispatch.py).

Only results whose raw log and JSON are committed under benchmarks/results/ may be entered here,
with the folder they come from.

PROVEN[backend][op] = the results folder whose native GPU test log shows that backend's kernels
for `op` passing. `auto` never picks a CUDA C++ kernel that is not listed here.

FASTEST[op][gpu_class] = (backend, results folder): the implementation measured fastest for `op`
on that GPU class. Without an entry, `auto` prefers Triton.

No GPU run has been committed yet, so every kernel is unproven and both tables are empty.
"""

GPU_CLASSES = ("H200", "H100", "A100", "L40S", "L4", "A10G", "RTX 4090", "RTX 3090", "V100", "T4")

PROVEN: dict[str, dict[str, str]] = {"triton": {}, "cuda": {}}

FASTEST: dict[str, dict[str, tuple[str, str]]] = {}
