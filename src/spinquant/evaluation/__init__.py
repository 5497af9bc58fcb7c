"""Text sources, perplexity and zero-shot scoring, the lm-eval bridge, and the comparison charts."""
