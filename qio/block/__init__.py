"""The block layer: a graph of driver nodes, the generic request path and the drivers."""
