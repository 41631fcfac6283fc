"""Sampling: generating from trained networks; sample grids."""
