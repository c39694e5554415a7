"""vdisk: the application (CLI, daemon, control API)."""
__version__ = "0.1.0"
