// The Vercel AI SDK (npm `ai` with the `@ai-sdk/openai` provider) against a running oaimux.
// Usage: node ai_sdk_smoke.mjs <base_url> <api_key>
// Prints one JSON object on stdout; tests/integration/test_clients_vercel_ai.py checks it.
import { createOpenAI } from "@ai-sdk/openai";
import { embedMany, generateText, streamText } from "ai";

const [baseURL, apiKey] = process.argv.slice(2);
if (!baseURL || !apiKey) {
  console.error("usage: node ai_sdk_smoke.mjs <base_url> <api_key>");
  process.exit(2);
}
const openai = createOpenAI({ baseURL, apiKey });
const prompt = "Say hello";

// openai.chat(): /chat/completions. A bare openai("...") model means the Responses API.
const chat = await generateText({ model: openai.chat("gpt-4o-mini"), prompt, maxRetries: 0 });

// streamText never throws: a failure reaches onError and the text stream just ends.
let streamError = null;
const stream = streamText({
  model: openai.chat("gpt-4o-mini"),
  prompt,
  maxRetries: 0,
  onError: ({ error }) => {
    streamError = String(error);
  },
});
const chunks = [];
for await (const delta of stream.textStream) {
  chunks.push(delta);
}

const responses = await generateText({ model: openai("gpt-4o"), prompt, maxRetries: 0 });

const { embeddings } = await embedMany({
  model: openai.embedding("text-embedding-3-small"),
  values: ["one", "two"],
  maxRetries: 0,
});

console.log(
  JSON.stringify({
    chat: chat.text,
    stream: chunks,
    streamError,
    responses: responses.text,
    embeddings,
  }),
);
