"""Fused Triton kernels of sfgrpo, installed as `sfgrpo.kernels` (never a top-level `kernels`).

One module per op: `@triton.jit` kernels plus a small launcher. Nothing here imports Triton at
package import time, so `import sfgrpo` works where Triton is absent.
"""
