"""One module per method: its config dataclass and its processors (``attnctrl.processors.<method>``)."""
