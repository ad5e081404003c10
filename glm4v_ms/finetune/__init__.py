"""Fine-tuning (issue 22): LoRA on the port's own layers, PEFT's adapter format, a trainer with LLaMA-Factory's keys."""
