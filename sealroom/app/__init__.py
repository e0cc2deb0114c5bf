"""The composition root: the CLI, the Python client, result rendering, the demo and the local
cluster. It may import every other package; nothing imports it.
"""
