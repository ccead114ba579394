"""Image, visual and checkpoint I/O: robust reading, atomic writing, safe checkpoint loading."""

from blindsr.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    LoadedImage,
    atomic_path,
    atomic_write,
    check_output_path,
    is_image_file,
    list_images,
    load_image,
    output_path_for,
    read_image,
    write_bytes_atomic,
    write_image,
)
from blindsr.io.visual import contact_grid, contact_sheet, kernel_image, save_kernel
from blindsr.io.weights import (
    load_into,
    load_safetensors_metadata,
    load_state_dict,
    save_safetensors,
    select_prefix,
    strip_prefix,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "LoadedImage", "atomic_path", "atomic_write", "check_output_path",
    "is_image_file", "list_images", "load_image", "output_path_for", "read_image", "write_bytes_atomic",
    "write_image", "contact_grid", "contact_sheet", "kernel_image", "save_kernel", "load_into",
    "load_safetensors_metadata", "load_state_dict", "save_safetensors", "select_prefix", "strip_prefix",
]
