"""diffusers pipelines for the methods that need extra passes (each built with ``from_pipe``): none yet."""
