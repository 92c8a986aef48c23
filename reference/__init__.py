"""The reference model: procedural scenes with exact answers, a small LLaVA-1.5 trained on them (its shipped weights
in assets/), its training, the quality benchmark that scores reducers on it, and the tiny random-weight test models."""
