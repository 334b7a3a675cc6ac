"""Training: data rendered by the chat template (data.py, datasets.py), SFT and pretraining
(lm.py, full or LoRA: lora.py) and preference training: the reward model (reward.py), DPO
(dpo.py, logprobs.py), online DPO (online_dpo.py), all trained by the one loop of trainer.py
(one config, config.py; checkpoints and resume, checkpoint.py; the Online Merging Optimizers,
merging_optimizer.py); model merging (merge.py, merge_io.py); and
automated data from the model's own samples (synth.py). `qwen2 train|merge|data ...` are the
*_cli.py modules.
"""
