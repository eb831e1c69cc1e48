"""Field device drivers, one folder each, registered as ``edge_agent.drivers`` entry points."""
