"""Projections (PCA) of a head's Q, K, V and O at its top (query, key) pairs (see README.md)."""
