"""BentoML service for a causal LM: POST /generate."""
