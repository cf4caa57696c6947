"""oaimux: one OpenAI-compatible endpoint in front of every model.

Importing this package (or any module in it) does nothing but define names.
"""

__version__ = "0.1.0"
