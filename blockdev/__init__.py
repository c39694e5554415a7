"""blockdev: the disk. Volumes, the op table, layers and front ends (NBD, FUSE); knows nothing of mirroring."""
