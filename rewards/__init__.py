"""Your GRPO reward functions: ``rewards.<module>:<function>`` in ``align.grpo.rewards``.

Each is called as ``fn(prompt, completion, reference) -> float`` per completion (docs/alignment.md).
Stages align and evaluate depend on this folder, so editing a reward re-runs them.
"""
