// The Vercel AI SDK (npm `ai`, pinned in package.json) as a client of chatd, unchanged: its
// DefaultChatTransport sends a message to replica A and reads the answer with
// readUIMessageStream; mid-answer the connection is dropped and the stream is resumed on
// replica B with reconnectToStream (GET <api>/<chat id>/stream); then the history is loaded
// as an app would after a reload (history.mjs). Prints one JSON line with what it saw;
// tests/e2e/test_ai_sdk_e2e.py runs it and checks it against chatd's own API.
//
// Environment: CHATD_A, CHATD_B (replica URLs), CHATD_TOKEN (a bearer token), CHAT_ID (a new
// UUID), TEXT (the message), MID_WORDS (how many words of the answer to read before dropping).

import { DefaultChatTransport, readUIMessageStream } from 'ai';

import { toUIMessages } from './history.mjs';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const token = env('CHATD_TOKEN');
const chatId = env('CHAT_ID');
const text = env('TEXT');
const midWords = Number(env('MID_WORDS'));

// Every request the transports make, to show where each one went.
const requests = [];
const recordingFetch = async (url, init) => {
  const response = await fetch(url, init);
  requests.push({ method: init?.method ?? 'GET', url: String(url), status: response.status });
  return response;
};

const transport = (base) =>
  new DefaultChatTransport({
    api: `${base}/api/v1/ai-sdk/chats`,
    headers: { Authorization: `Bearer ${token}` },
    fetch: recordingFetch,
  });

const textOf = (message) =>
  message.parts
    .filter((part) => part.type === 'text')
    .map((part) => part.text)
    .join('');

const withDeadline = async (promise, ms, what) => {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer); // a pending timer would keep the process alive
  }
};

async function main() {
  // 1. Send on replica A and read the answer until it is well under way.
  const first = transport(env('CHATD_A'));
  const abort = new AbortController();
  const userMessage = { id: 'u1', role: 'user', parts: [{ type: 'text', text }] };
  const stream = await first.sendMessages({
    chatId,
    messages: [userMessage],
    trigger: 'submit-message',
    messageId: undefined,
    abortSignal: abort.signal,
  });
  let partial = null;
  const readPartial = async () => {
    for await (const message of readUIMessageStream({ stream, terminateOnError: true })) {
      partial = message;
      if (textOf(message).split(/\s+/).filter(Boolean).length >= midWords) return;
    }
    throw new Error('the answer ended before the client dropped the connection');
  };
  await withDeadline(readPartial(), 60_000, 'the first words of the answer');
  abort.abort(); // the page goes away: the turn goes on without it

  // 2. Resume on replica B: the answer from its start, then live, to its end.
  const second = transport(env('CHATD_B'));
  const resumed = await second.reconnectToStream({ chatId });
  if (resumed === null) throw new Error('GET …/stream answered 204 while the answer was running');
  const chunkTypes = [];
  const counted = resumed.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunkTypes.push(chunk.type);
        controller.enqueue(chunk);
      },
    }),
  );
  let final = null;
  const readAll = async () => {
    for await (const message of readUIMessageStream({ stream: counted, terminateOnError: true })) {
      final = message;
    }
  };
  await withDeadline(readAll(), 60_000, 'the resumed answer');

  // 3. Nothing runs any more: the SDK's resume finds nothing (204).
  const idle = await second.reconnectToStream({ chatId });

  // 4. After a reload an app gives useChat chatd's history (docs/api.md): the answer there is
  // the message the stream assembled.
  const history = await recordingFetch(`${env('CHATD_B')}/api/v1/chats/${chatId}/messages`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  const loaded = toUIMessages((await history.json()).messages);

  console.log(
    JSON.stringify({
      partial: { id: partial.id, role: partial.role, text: textOf(partial) },
      final: { id: final.id, role: final.role, text: textOf(final), parts: final.parts },
      chunkTypes,
      idleAfterwards: idle === null,
      loaded: loaded.map((m) => ({ id: m.id, role: m.role, text: textOf(m), parts: m.parts })),
      requests,
    }),
  );
}

main().catch((error) => {
  console.error(error?.stack ?? String(error));
  process.exit(1);
});
