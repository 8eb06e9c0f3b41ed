"""The built-in engine: transformers models, our decode loop and continuous batch."""
