"""oaimux: one OpenAI-compatible endpoint in front of every model.

Importing this package (or any module in it) does nothing but define names.
"""

__version__ = "0.1.0"

# The Server header of every response: the name alone. aiohttp's default names
# the Python and aiohttp versions, a disclosure scanners report.
SERVER = "oaimux"
