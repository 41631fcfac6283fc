"""Programs: the only layer that reads ConfigDicts."""
