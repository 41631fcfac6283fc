"""Device mesh, axis names and sharding rules."""
