"""Training: data rendered by the chat template (data.py, datasets.py), SFT and pretraining
(trainer.py, full or LoRA: lora.py), checkpoints and resume; preference training (align.py):
the reward model (reward.py), DPO (dpo.py, logprobs.py), online DPO (online_dpo.py) with the
Online Merging Optimizers (merging_optimizer.py); model merging (merge.py, merge_io.py); and
automated data from the model's own samples (synth.py). `qwen2 train|merge|data ...` are the
*_cli.py modules.
"""
