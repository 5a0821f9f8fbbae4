"""Per op family: the public functions with their argument checks, the torch.library registration
of each backend, the autograd formulas, and the torch reference. Kernels live in
fastnets/kernels/<family>.py (Triton) and csrc/<family>.cu (CUDA C++)."""
