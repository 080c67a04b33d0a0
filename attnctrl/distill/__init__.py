"""Training recipes that produce weights for a method (``attnctrl distill ...``)."""
