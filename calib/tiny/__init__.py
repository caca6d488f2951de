"""The embedded tiny Qwen-Image-Edit: its model and weights (`model`), the shapes edit dataset and its metric
(`shapes`), and its training (`train`)."""
