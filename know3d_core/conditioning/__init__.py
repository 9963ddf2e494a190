"""Image conditioning for TRELLIS.2: front-image preprocessing and DINOv3 features."""
from .dinov3 import DinoV3FeatureExtractor, get_cond, load_dinov3_model, num_feature_tokens
from .preprocess import preprocess_image, preprocess_image_tensor

__all__ = [
    "DinoV3FeatureExtractor",
    "get_cond",
    "load_dinov3_model",
    "num_feature_tokens",
    "preprocess_image",
    "preprocess_image_tensor",
]
