"""The ``llm`` library's Python API on the model that extra-openai-models.yaml points
at oaimux: a whole answer, and a streamed one chunk by chunk (the CLI prints a
stream as one text).

Usage: python drive_llm.py <model_id>; LLM_USER_PATH holds the yaml and keys.json.
Runs in the isolated client venv (tests/clients/harness.py), not the project's.
"""

import json
import sys

import llm

model = llm.get_model(sys.argv[1])
answer = model.prompt("Say hello", stream=False).text()
chunks = list(model.prompt("Say hello", stream=True))
print(json.dumps({"chat": answer, "stream": chunks}))
