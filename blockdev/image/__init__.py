"""Image stores: the bottom of every layer stack."""
from .file import FileImage
from .memory import MemoryImage

__all__ = ["FileImage", "MemoryImage"]
