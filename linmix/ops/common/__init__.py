"""Helpers shared by several ops: the chunk layout of sequences and the Triton launch helpers."""
