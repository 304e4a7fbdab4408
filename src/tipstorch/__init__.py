"""tipstorch: TIPS and TIPSv2 image-text encoders with spatial awareness, in PyTorch."""

from tipstorch.data.transforms import image_transform
from tipstorch.models.registry import list_models
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import ImageFeatures
from tipstorch.weights.factory import create_model, get_tokenizer, load_model
from tipstorch.weights.state_io import CheckpointError
from tipstorch.weights.tipstorch_file import save_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ImageFeatures",
    "TIPSConfig",
    "TIPSModel",
    "__version__",
    "create_model",
    "get_tokenizer",
    "image_transform",
    "list_models",
    "load_model",
    "save_model",
]
