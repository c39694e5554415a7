"""mirror: replication of a volume's writes to a replica site. Depends on blockdev, never on vdisk."""
