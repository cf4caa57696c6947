"""The litellm SDK pointed at oaimux: ``model="openai/<id>"`` with ``api_base``.

Usage: python drive_litellm.py <base_url> <api_key>; prints one JSON report.
Runs in the isolated client venv (tests/clients/harness.py), not the project's.
The test sets LITELLM_LOCAL_MODEL_COST_MAP=True: otherwise importing litellm
fetches its model cost map from the internet. Its tiktoken files ship inside the
package (litellm points TIKTOKEN_CACHE_DIR there).
"""

import json
import sys

import litellm

base_url, api_key = sys.argv[1:3]
messages = [{"role": "user", "content": "Say hello"}]
common = {"api_base": base_url, "api_key": api_key, "num_retries": 0}

answer = litellm.completion(model="openai/gpt-4o-mini", messages=messages, **common)
stream = litellm.completion(model="openai/gpt-4o-mini", messages=messages, stream=True, **common)
chunks = [chunk.choices[0].delta.content for chunk in stream]
embedded = litellm.embedding(model="openai/text-embedding-3-small", input=["one", "two"], **common)

print(
    json.dumps(
        {
            "chat": answer.choices[0].message.content,
            "stream": chunks,
            "embeddings": [item["embedding"] for item in embedded.data],
        }
    )
)
