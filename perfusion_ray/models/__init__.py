"""Models: the CLIP tokenizer, merchant encoder, crossing network, reward model, diffusion base model,
personalized adaptive network and pipeline."""
