"""The ``attnctrl`` command line (``attnctrl.cli.main:main``)."""
