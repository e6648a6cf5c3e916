"""``ppfast demo``: a small GPT-style model trained pipelined on local ranks."""
