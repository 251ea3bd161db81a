// chatd's history (GET /api/v1/chats/{id}/messages) as the AI SDK's UI messages, to give
// useChat({messages}) after a reload. The same function is shown in docs/api.md ("Vercel AI
// SDK"); client.mjs checks it against the answer the stream assembled.
//
// Each user message is a UI user message; the answer to it (every assistant and tool message
// until the next user message) is one UI assistant message named answer-<user message id>, the
// id its UI message stream gives it, so a resumed stream replaces it instead of adding one.
export function toUIMessages(messages) {
  const ui = [];
  let answer = null;
  for (const m of messages) {
    if (m.role === 'user') {
      const parts = m.content.map((p) => ({ type: 'text', text: p.text }));
      ui.push({ id: `user-${m.id}`, role: 'user', parts });
      answer = { id: `answer-${m.id}`, role: 'assistant', parts: [] };
      ui.push(answer);
    } else if (m.role === 'assistant' && answer) {
      answer.parts.push({ type: 'step-start' });
      for (const p of m.content) {
        if (p.type === 'text' || p.type === 'reasoning') {
          answer.parts.push({ type: p.type, text: p.text, state: 'done' });
        } else if (p.type === 'tool_call') {
          answer.parts.push({
            type: 'dynamic-tool',
            toolName: p.name,
            toolCallId: p.id,
            state: 'input-available',
            input: p.args,
          });
        }
      }
    } else if (m.role === 'tool' && answer) {
      for (const r of m.content) {
        const call = answer.parts.find((p) => p.toolCallId === r.tool_call_id);
        if (!call) continue;
        if (r.is_error) {
          const errorText = typeof r.result === 'string' ? r.result : JSON.stringify(r.result);
          Object.assign(call, { state: 'output-error', errorText });
        } else {
          Object.assign(call, { state: 'output-available', output: r.result });
        }
      }
    }
  }
  return ui.filter((m) => m.parts.length > 0); // an answer that has no step yet
}
