"""Model weights: the download cache, the checkpoint formats and the public constructors."""
