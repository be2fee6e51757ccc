"""Inspection figures of methods (`vlp show METHOD`): one module per figure, named by the method class's `figure`."""
