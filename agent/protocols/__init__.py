"""Protocol helpers shared by drivers and uplinks."""
