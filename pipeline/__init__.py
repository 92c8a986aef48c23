"""The Ray Data batch job runner: configuration, sources, decoding, the model actor, sinks, planner and audit."""
