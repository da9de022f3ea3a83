"""The DRM engine the nodes and the trainers run: the reward model, its files, and the step-wise search."""
