"""Training loops: pretraining of the embedded models, the reward model, alignment."""
