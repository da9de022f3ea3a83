"""Step-GRPO and GRPO fine-tuning into a ComfyUI LoRA: config, rollout, loss, policy, LoRA export, the loop."""
