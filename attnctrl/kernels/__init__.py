"""Fast attention variants, each with a pure-PyTorch reference (local windows, token merging): none yet.

The log-sum-exp primitives every kernel builds on live in :mod:`attnctrl.core.attention`.
"""
