"""pf-metaflow: pay the agents that do a Metaflow flow's work through Purple Flea escrow."""

__version__ = "0.1.0"
