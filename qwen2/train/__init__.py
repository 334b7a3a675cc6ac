"""Training: data rendered by the chat template, SFT (full and LoRA), pretraining, checkpoints."""
