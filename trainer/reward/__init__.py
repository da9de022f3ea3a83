"""Training a DRM from preference pairs: pairs, images, encoding and cache, and the loop."""
