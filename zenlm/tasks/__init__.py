"""Applications built on the library: translation, chat, data preparation for the recipes.

Each module is a thin layer over ``generate`` and ``train``; importing this package
imports nothing heavy.
"""
