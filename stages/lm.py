"""causal_lm model side (train, evaluate): building the model, LoRA, NLL, generation."""
