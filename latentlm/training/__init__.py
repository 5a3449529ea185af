"""Training: the one loop every stage runs (`loop`), precision, optimization, checkpoints, the
encoder and latent caches, the stages (`stages/`, with the `STAGES` registry) and the end-to-end run
(`run`)."""
