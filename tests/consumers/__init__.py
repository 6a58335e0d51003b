"""What fine-tuning stacks check when they read an export, implemented from their own rules
(OpenAI's data preparation guidance, LLaMA-Factory's converters) or run for real (Hugging Face
`datasets`, TRL's trainers in `trl_train`)."""
