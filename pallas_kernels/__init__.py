"""Pallas GPU kernels for grouped expert matmuls, each with a pure-JAX reference beside it."""
