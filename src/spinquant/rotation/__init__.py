"""Rotations: Hadamard constructions, merging R1/R2 into the weights, rotation sets and their files."""
