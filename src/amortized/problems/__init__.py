"""Concrete problem families that reproduce the seeds."""
