"""Scale: mesh rules and sharding, multi-host JAX, fault tolerance, FLOPs and compute planning."""
