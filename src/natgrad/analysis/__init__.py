"""Analyses of input gradients: edges (oriented energy), and more to come."""

from natgrad.analysis.edges import (
    edge_map,
    gaussian_derivative_filters,
    oriented_energy,
)

__all__ = ["edge_map", "gaussian_derivative_filters", "oriented_energy"]
