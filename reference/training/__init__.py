"""Training of the reference model from scratch on procedural scenes: data, losses, and the loop that runs them."""
