// The official openai npm package against a running oaimux.
// Usage: node sdk_smoke.mjs <base_url> <api_key>
// Prints one JSON object on stdout; tests/integration/test_surface_node_sdk.py checks it.
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
if (!baseURL || !apiKey) {
  console.error("usage: node sdk_smoke.mjs <base_url> <api_key>");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });

const stream = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Say hello" }],
  stream: true,
});
const deltas = [];
for await (const chunk of stream) {
  deltas.push(chunk.choices[0]?.delta?.content ?? "");
}

const models = [];
for await (const model of client.models.list()) {
  models.push(model.id);
}

let notFound = null;
try {
  await client.chat.completions.create({
    model: "no-such-model",
    messages: [{ role: "user", content: "hi" }],
  });
} catch (err) {
  notFound = {
    isNotFoundError: err instanceof OpenAI.NotFoundError,
    status: err.status,
    code: err.code,
  };
}

let unauthorized = null;
try {
  await new OpenAI({ baseURL, apiKey: "sk-wrong-key", maxRetries: 0 }).models.list();
} catch (err) {
  unauthorized = {
    isAuthenticationError: err instanceof OpenAI.AuthenticationError,
    status: err.status,
  };
}

console.log(JSON.stringify({ deltas, models, notFound, unauthorized }));
