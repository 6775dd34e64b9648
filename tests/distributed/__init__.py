"""Helpers for the ``distributed`` test tier: Metaflow's production topology on one machine."""
