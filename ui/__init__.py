"""The browser app (Gradio): one module per tab; it reaches the engine only through core.session and plain functions."""
