"""What every image store shares: capabilities that follow from being writable or not."""
from __future__ import annotations


class ImageBase:
    """Capabilities of a raw image; subclasses set ``readonly`` and ``_block`` and do the I/O."""

    readonly: bool
    _block: int

    def block_size(self) -> int:
        return self._block

    def can_write(self) -> bool:
        return not self.readonly

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return not self.readonly

    def can_zero(self) -> bool:
        return not self.readonly

    def can_fast_zero(self) -> bool:
        return not self.readonly

    def allocated(self) -> int | None:
        """Unknown unless the store says (a file does: its st_blocks)."""
        return None

    def plug(self) -> None:
        """Images issue every write at once: nothing to defer."""

    def unplug(self) -> None:
        pass
