"""LangChain's ChatOpenAI and OpenAIEmbeddings pointed at oaimux with ``base_url``.

Usage: python drive_langchain.py <base_url> <api_key>; prints one JSON report.
Runs in the isolated client venv (tests/clients/harness.py), not the project's.
"""

import json
import sys

from langchain_openai import ChatOpenAI, OpenAIEmbeddings

base_url, api_key = sys.argv[1:3]

chat = ChatOpenAI(model="gpt-4o-mini", base_url=base_url, api_key=api_key, max_retries=0)
answer = chat.invoke("Say hello")
chunks = [chunk.content for chunk in chat.stream("Say hello")]

# check_embedding_ctx_length=False: with the default (True) LangChain first splits
# the text with tiktoken, which downloads its BPE file on first use, and then sends
# token ids instead of the text; an OpenAI-compatible upstream wants the text.
embeddings = OpenAIEmbeddings(
    model="text-embedding-3-small",
    base_url=base_url,
    api_key=api_key,
    check_embedding_ctx_length=False,
    max_retries=0,
)
vectors = embeddings.embed_documents(["one", "two"])

print(json.dumps({"chat": answer.content, "stream": chunks, "embeddings": vectors}))
