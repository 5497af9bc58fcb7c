"""Learning R1/R2: the Cayley SGD step on the Stiefel manifold and the training loop with its checkpoints."""
