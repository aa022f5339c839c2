"""Tools beside the editing: the LAION-style benchmark builder and the one-step extraction scores."""
