"""Task causal_lm: next-token prediction on plain text, or a response given a prompt (data.py,
model.py, evaluate.py)."""
