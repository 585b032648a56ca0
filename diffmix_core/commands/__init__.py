"""The `diffmix` commands' bodies, one module per group of subcommands: each reads the parsed
options, calls the library stage and prints what it did. cli.py declares the options and
dispatches here; :mod:`.options` turns config dataclasses into options and back.

Heavy libraries (torch, diffusers, gradio) are imported inside the functions, so that
`diffmix --help` stays fast.
"""
