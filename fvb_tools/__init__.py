"""What people run: the ``fvb`` command line, the bulk client and the local stack of real
servers. It may import every layer below it."""
