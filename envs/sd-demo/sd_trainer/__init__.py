"""A small SD3 LoRA trainer that reads SimpleTuner's config files (see README.md)."""
