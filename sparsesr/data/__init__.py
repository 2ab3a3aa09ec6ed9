"""Image I/O, MATLAB-compatible bicubic resizing and SR datasets."""
from __future__ import annotations

from sparsesr.data.datasets import SRImageDataset, SRPatchDataset, list_images, split_holdout
from sparsesr.data.image_io import IMAGE_EXTENSIONS, Image, quantize, read_image, to_uint8, write_image
from sparsesr.data.resize import imresize

__all__ = [
    "IMAGE_EXTENSIONS",
    "Image",
    "SRImageDataset",
    "SRPatchDataset",
    "imresize",
    "list_images",
    "quantize",
    "read_image",
    "split_holdout",
    "to_uint8",
    "write_image",
]
