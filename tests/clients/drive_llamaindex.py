"""LlamaIndex's OpenAILike LLM and OpenAIEmbedding pointed at oaimux with ``api_base``.

Usage: python drive_llamaindex.py <base_url> <api_key>; prints one JSON report.
Runs in the isolated client venv (tests/clients/harness.py), not the project's.
LlamaIndex ships its NLTK data and tiktoken files inside the package
(llama_index/core/_static) and points NLTK_DATA / TIKTOKEN_CACHE_DIR there, so
nothing is downloaded; the offline guard would report it if it were.
"""

import json
import sys

from llama_index.core.llms import ChatMessage
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai_like import OpenAILike

base_url, api_key = sys.argv[1:3]

# is_chat_model=True: /chat/completions, not the legacy /completions.
llm = OpenAILike(
    model="gpt-4o-mini", api_base=base_url, api_key=api_key, is_chat_model=True, max_retries=0
)
messages = [ChatMessage(role="user", content="Say hello")]
answer = llm.chat(messages)
chunks = [part.delta for part in llm.stream_chat(messages)]

embed = OpenAIEmbedding(
    model_name="text-embedding-3-small", api_base=base_url, api_key=api_key, max_retries=0
)
vectors = embed.get_text_embedding_batch(["one", "two"])

print(json.dumps({"chat": answer.message.content, "stream": chunks, "embeddings": vectors}))
