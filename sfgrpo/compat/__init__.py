"""Drop-in replacements for other GRPO trainers' functions (same signatures, same results)."""
