"""Task classification: text -> label (data.py, model.py, evaluate.py)."""
