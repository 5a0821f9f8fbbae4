"""Triton kernels and their launchers, one module per op family.

These modules import triton at import time, so the ops import them lazily (at the first launch):
TRITON_INTERPRET=1 must be set before that import for the interpreter to take effect."""
