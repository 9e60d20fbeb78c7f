"""Video and audio tokenizer configs."""
