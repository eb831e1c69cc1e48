"""The fleet control plane: signed documents and commands from the operator, checked before anything changes."""
