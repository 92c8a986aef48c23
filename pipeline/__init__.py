"""Ray Data pipeline pieces and the procedural scenes of the reference model and quality benchmark."""
