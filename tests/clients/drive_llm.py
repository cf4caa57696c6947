"""The ``llm`` library's Python API on the model that extra-openai-models.yaml points
at oaimux, to see the streamed chunks one by one (the CLI prints them as one text).

Usage: python drive_llm.py <model_id>; LLM_USER_PATH holds the yaml and keys.json.
Runs in the isolated client venv (tests/clients/harness.py), not the project's.
"""

import json
import sys

import llm

model = llm.get_model(sys.argv[1])
chunks = list(model.prompt("Say hello", stream=True))
print(json.dumps({"stream": chunks}))
