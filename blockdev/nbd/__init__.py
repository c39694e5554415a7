"""NBD server: a sans-IO protocol core (handshake.py, transmission.py) and a thin trio server."""
