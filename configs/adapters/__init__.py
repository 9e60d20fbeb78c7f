"""LoRA / FlyLoRA adapter configs."""
