"""Datasets, preprocessing and loaders."""
from .archive import cache_root, unpack
from .folder import ImageFolder, read_image, resolve_split_dir
from .loader import epoch_order, holdout_indices, iterate, make_loader, subset_indices
from .transforms import EvalTransform, PadCropFlip

__all__ = ["EvalTransform", "ImageFolder", "PadCropFlip", "cache_root", "epoch_order", "holdout_indices", "iterate", "make_loader", "read_image", "resolve_split_dir", "subset_indices", "unpack"]
