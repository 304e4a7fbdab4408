"""tipstorch: TIPS and TIPSv2 image-text encoders with spatial awareness, in PyTorch."""

__version__ = "0.1.0"
