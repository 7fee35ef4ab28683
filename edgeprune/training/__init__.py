"""The CPU fine-tuning loop shared by the originals, the dense baseline, progressive pruning and recovery
(:mod:`.loop`)."""
