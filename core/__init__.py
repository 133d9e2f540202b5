"""The training engine: configuration, models, adapters, data, class images, trainer and session.

Nothing in this package imports gradio; the UI talks to it through `core.session` and plain functions.
"""
