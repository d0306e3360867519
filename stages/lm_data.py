"""causal_lm data side (prepare): BPE tokenizer training, packing, prompt masking."""
