// The chatd web page (docs/web.md): log in (an API token or a one-time login link), the chat
// list live from the watch stream, one chat's history and streaming answer, the composer, the
// queue, Stop, edit and archive. Plain ES modules, no build step; every piece of model or user
// text reaches the DOM as text nodes (markdown.js), never as HTML.

import { ApiError, api, describeError, setCsrfToken, setUnauthorizedHandler } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { ChatStream, WatchStream } from "./streams.js";

const $ = (id) => document.getElementById(id);
const CHAT_ROUTE = /^#\/chats\/([0-9a-f-]{36})$/;
const LIST_PAGE = 100;
// Statuses Stop applies to (requires_action: the chat waits for its client's tool results,
// and Stop ends the wait; docs/requires_action.md).
const BUSY = new Set(["pending", "running", "requires_action"]);

const state = {
  session: null,
  chats: new Map(), // id -> Chat (docs/api.md), kept current by the watch stream
  listNext: null,
  models: [],
  watch: null,
  view: null, // the open chat: { chatId, chat, stream, nodes, liveNode }
  retryTimer: null,
  renderQueued: false,
};

// ------------------------------------------------------------------------------------------
// Small DOM helpers.

function make(tag, { text, className, attrs } = {}, children = []) {
  const node = document.createElement(tag);
  if (text !== undefined) {
    node.textContent = text;
  }
  if (className) {
    node.className = className;
  }
  for (const [name, value] of Object.entries(attrs || {})) {
    node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function button(label, onClick, { className = "secondary", ariaLabel } = {}) {
  const node = make("button", { text: label, className, attrs: { type: "button" } });
  if (ariaLabel) {
    node.setAttribute("aria-label", ariaLabel);
  }
  node.addEventListener("click", onClick);
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function textOf(content) {
  if (typeof content === "string") {
    return content;
  }
  return (content || []).filter((part) => part.type === "text").map((part) => part.text).join("");
}

function chatLabel(chat) {
  return chat.title && chat.title.trim() ? chat.title : "Untitled chat";
}

function json(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

// ------------------------------------------------------------------------------------------
// Logging in and out.

function showLogin(message = "") {
  teardown();
  document.body.dataset.view = "login";
  show($("loading"), false);
  show($("app-view"), false);
  show($("login-view"), true);
  $("login-error").textContent = message;
  $("token").value = "";
  $("token").focus();
}

function teardown() {
  closeChat();
  if (state.watch) {
    state.watch.close();
    state.watch = null;
  }
  state.session = null;
  state.chats.clear();
  state.listNext = null;
  setCsrfToken(null);
}

async function startApp(session) {
  state.session = session;
  setCsrfToken(session.csrf_token);
  // Before the app is shown: a model picked in a "New chat" opened meanwhile would be reset to
  // the default when the models arrived (and the chat sent with the wrong model).
  await loadModels();
  if (location.pathname !== "/") {
    history.replaceState(null, "", `/${location.hash}`);
  }
  document.body.dataset.view = "app";
  show($("loading"), false);
  show($("login-view"), false);
  show($("app-view"), true);
  $("whoami").textContent = session.user.name;
  state.watch = new WatchStream({
    onEvent: applyWatchEvent,
    onConnected: () => listChats(),
    onConnection: (connected) => {
      $("list-status").textContent = connected ? "" : "Reconnecting…";
    },
  });
  state.watch.start();
  route();
}

async function boot() {
  setUnauthorizedHandler(() => {
    if (state.session) {
      showLogin("Your session has ended. Log in again.");
    }
  });
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (location.pathname === "/login" && code) {
    history.replaceState(null, "", "/login"); // the code is spent either way: out of the URL
    try {
      await startApp(await api("POST", "/api/v1/sessions/login-code", { code }, { quiet401: true }));
      return;
    } catch (error) {
      showLogin(describeError(error));
      return;
    }
  }
  try {
    await startApp(await api("GET", "/api/v1/sessions/current", undefined, { quiet401: true }));
  } catch (error) {
    showLogin(error instanceof ApiError && error.status === 401 ? "" : describeError(error));
  }
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    return;
  }
  $("login-error").textContent = "";
  try {
    const session = await api("POST", "/api/v1/sessions", { token }, { quiet401: true });
    $("token").value = "";
    await startApp(session);
  } catch (error) {
    $("login-error").textContent = error instanceof ApiError && error.status === 401
      ? "That token was not accepted."
      : describeError(error);
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api("DELETE", "/api/v1/sessions/current", undefined, { quiet401: true });
  } catch {
    // Logged out locally either way; an unreachable server forgets the session at its expiry.
  }
  history.replaceState(null, "", "/");
  showLogin("You are logged out.");
});

// ------------------------------------------------------------------------------------------
// Model configs.

async function loadModels() {
  try {
    const answer = await api("GET", "/api/v1/model-configs");
    state.models = answer.model_configs.filter((config) => config.enabled);
  } catch {
    state.models = [];
  }
}

function renderModelPicker(chat) {
  const select = $("model");
  select.replaceChildren();
  for (const config of state.models) {
    const label = config.display_name || `${config.provider}/${config.model}`;
    const option = make("option", { text: label, attrs: { value: config.id } });
    select.append(option);
  }
  if (chat) {
    if (chat.model_config_id && !state.models.some((c) => c.id === chat.model_config_id)) {
      select.append(make("option", { text: "(a disabled model)", attrs: { value: chat.model_config_id } }));
    }
    select.value = chat.model_config_id || "";
    select.disabled = true; // a chat keeps the model it was created with
    select.title = "The model of this chat";
  } else {
    const preferred = state.models.find((config) => config.is_default) || state.models[0];
    if (preferred) {
      select.value = preferred.id;
    }
    select.disabled = false;
    select.title = "The model of the new chat";
  }
}

// ------------------------------------------------------------------------------------------
// The chat list.

async function listChats() {
  try {
    const page = await api("GET", `/api/v1/chats?limit=${LIST_PAGE}`);
    // The page replaces what was known (a chat deleted meanwhile goes), except where a watch
    // event that raced the answer already told a newer version.
    state.chats = new Map(page.chats.map((chat) => {
      const known = state.chats.get(chat.id);
      return [chat.id, known && known.version > chat.version ? { ...chat, ...known } : chat];
    }));
    state.listNext = page.next;
  } catch (error) {
    $("list-status").textContent = `The chat list could not be loaded: ${describeError(error)}`;
    return;
  }
  renderChatList();
  refreshOpenChatSummary();
}

$("more-chats").addEventListener("click", async () => {
  if (!state.listNext) {
    return;
  }
  try {
    const page = await api(
      "GET", `/api/v1/chats?limit=${LIST_PAGE}&before=${encodeURIComponent(state.listNext)}`,
    );
    for (const chat of page.chats) {
      if (!state.chats.has(chat.id)) {
        state.chats.set(chat.id, chat);
      }
    }
    state.listNext = page.next;
  } catch (error) {
    $("list-status").textContent = describeError(error);
  }
  renderChatList();
});

// A chat's newest known state: answers of requests and watch events race, and the one with the
// higher version wins.
function upsertChat(chat) {
  const known = state.chats.get(chat.id);
  if (!known || known.version === undefined || known.version === null || chat.version >= known.version) {
    state.chats.set(chat.id, { ...(known || {}), ...chat });
  }
}

function applyWatchEvent(event) {
  const known = state.chats.get(event.chat_id);
  if (event.type === "deleted") {
    state.chats.delete(event.chat_id);
  } else if (!known || event.version === null || event.version >= known.version) {
    state.chats.set(event.chat_id, {
      ...(known || { id: event.chat_id, created_at: new Date().toISOString() }),
      status: event.status,
      title: event.title,
      archived: event.archived,
      parent_chat_id: event.parent_chat_id,
      version: event.version,
    });
  }
  renderChatList();
  refreshOpenChatSummary();
}

function renderChatList() {
  const list = $("chat-list");
  const showArchived = $("show-archived").checked;
  const openId = state.view ? state.view.chatId : null;
  const chats = [...state.chats.values()]
    .filter((chat) => !chat.parent_chat_id && (showArchived || !chat.archived))
    .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
  const existing = new Map([...list.children].map((item) => [item.dataset.chatId, item]));
  const items = chats.map((chat) => {
    let item = existing.get(chat.id);
    if (!item) {
      const link = make("a", { attrs: { href: `#/chats/${chat.id}` } }, [
        make("span", { className: "chat-title" }),
        make("span", { className: "status" }),
      ]);
      item = make("li", {}, [link]);
      item.dataset.chatId = chat.id;
    }
    const link = item.firstElementChild;
    link.querySelector(".chat-title").textContent = chatLabel(chat);
    const badge = link.querySelector(".status");
    badge.textContent = chat.archived ? "archived" : chat.status;
    badge.dataset.status = chat.status;
    if (chat.id === openId) {
      link.setAttribute("aria-current", "page");
    } else {
      link.removeAttribute("aria-current");
    }
    return item;
  });
  for (const [id, item] of existing) {
    if (!items.includes(item)) {
      item.remove();
      existing.delete(id);
    }
  }
  // Reorder only when needed: moving a node that holds the keyboard focus would drop it.
  const inOrder = items.every((item, index) => list.children[index] === item);
  if (!inOrder) {
    list.replaceChildren(...items);
  }
  show($("more-chats"), Boolean(state.listNext));
  if (state.view) {
    renderRelations();
  }
}

$("show-archived").addEventListener("change", renderChatList);
$("new-chat").addEventListener("click", () => {
  // Routed now, not on the hashchange event that a hash assignment queues: a model picked
  // right after the click must not be reset by a late re-render of the new chat.
  if (location.hash !== "#/new") {
    history.pushState(null, "", "#/new");
  }
  route();
});

// ------------------------------------------------------------------------------------------
// Routing: #/ (home), #/new, #/chats/<id>.

function route() {
  if (!state.session) {
    return;
  }
  const match = CHAT_ROUTE.exec(location.hash);
  if (match) {
    document.body.dataset.route = "chat";
    openChat(match[1]);
    return;
  }
  document.body.dataset.route = location.hash === "#/new" ? "new" : "home";
  openNewChat();
  if (location.hash === "#/new") {
    $("message").focus(); // the composer is shown now (on a narrow screen it was not before)
  }
}

window.addEventListener("hashchange", route);

// ------------------------------------------------------------------------------------------
// The chat view.

function resetChatView() {
  $("messages").replaceChildren();
  $("queue").replaceChildren();
  show($("queue-section"), false);
  show($("retry-banner"), false);
  show($("error-banner"), false);
  show($("not-found"), false);
  show($("connection"), false);
  show($("parent-link"), false);
  show($("children"), false);
  show($("composer"), true);
  $("composer-error").textContent = "";
  $("chat-status").textContent = "";
  delete $("chat-status").dataset.status;
  stopRetryTimer();
}

function closeChat() {
  if (state.view) {
    state.view.stream.close();
    state.view = null;
  }
  stopRetryTimer();
}

function openNewChat() {
  closeChat();
  resetChatView();
  $("chat-title").textContent = "New chat";
  show($("archive"), false);
  $("stop").disabled = true;
  renderModelPicker(null);
  renderChatList();
}

async function openChat(chatId) {
  if (state.view && state.view.chatId === chatId) {
    return;
  }
  closeChat();
  resetChatView();
  const view = {
    chatId,
    chat: state.chats.get(chatId) || null,
    stream: null,
    nodes: new Map(),
    liveNode: null,
    queueKey: "[]",
  };
  state.view = view;
  $("chat-title").textContent = view.chat ? chatLabel(view.chat) : "";
  renderChatList();
  try {
    view.chat = await api("GET", `/api/v1/chats/${chatId}`);
  } catch (error) {
    if (state.view !== view) {
      return;
    }
    if (error instanceof ApiError && error.status === 404) {
      showGone("not_found");
    } else if (!(error instanceof ApiError && error.status === 401)) {
      $("not-found").textContent = `This chat could not be loaded: ${describeError(error)}`;
      show($("not-found"), true);
    }
    return;
  }
  if (state.view !== view) {
    return;
  }
  upsertChat(view.chat);
  renderModelPicker(view.chat);
  refreshOpenChatSummary();
  view.stream = new ChatStream(chatId, {
    onChange: () => scheduleRender(view),
    onConnection: (connected) => {
      if (state.view === view) {
        show($("connection"), !connected);
      }
    },
    onGone: (reason) => {
      if (state.view === view) {
        showGone(reason);
      }
    },
  });
  view.stream.start();
}

function showGone(reason) {
  $("not-found").textContent = reason === "deleted"
    ? "This chat was deleted."
    : "This chat does not exist, or it is not yours.";
  show($("not-found"), true);
  show($("composer"), false);
  show($("archive"), false);
  $("chat-title").textContent = "Chat not found";
}

// The title, status and archive button of the open chat, from the list (kept live by the watch
// stream) and from its own stream.
function refreshOpenChatSummary() {
  const view = state.view;
  if (!view || !view.chat) {
    return;
  }
  const summary = state.chats.get(view.chatId);
  if (summary) {
    view.chat = { ...view.chat, ...summary };
  }
  const status = view.stream && view.stream.status ? view.stream.status : view.chat.status;
  $("chat-title").textContent = chatLabel(view.chat);
  $("chat-status").textContent = status;
  $("chat-status").dataset.status = status;
  $("stop").disabled = !BUSY.has(status);
  const archive = $("archive");
  archive.textContent = view.chat.archived ? "Unarchive" : "Archive";
  show(archive, true);
  renderRelations();
}

function renderRelations() {
  const view = state.view;
  if (!view || !view.chat) {
    return;
  }
  const parentId = view.chat.parent_chat_id;
  const parentLink = $("parent-link");
  if (parentId) {
    const parent = state.chats.get(parentId);
    parentLink.replaceChildren(
      "Sub-agent of ",
      make("a", { text: parent ? chatLabel(parent) : "its parent chat", attrs: { href: `#/chats/${parentId}` } }),
    );
  }
  show(parentLink, Boolean(parentId));
  const children = [...state.chats.values()]
    .filter((chat) => chat.parent_chat_id === view.chatId)
    .sort((a, b) => (a.created_at < b.created_at ? -1 : 1));
  const nav = $("children");
  nav.replaceChildren(
    make("span", { text: "Sub-agents: " }),
    ...children.map((child) => make("a", {
      text: `${chatLabel(child)} (${child.status})`,
      attrs: { href: `#/chats/${child.id}` },
    })),
  );
  show(nav, children.length > 0);
}

function scheduleRender(view) {
  if (state.renderQueued) {
    return;
  }
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    if (state.view === view) {
      renderChat(view);
    }
  });
}

function renderChat(view) {
  const stream = view.stream;
  const list = $("messages");
  const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const ordered = stream.orderedMessages();
  const keep = new Set(ordered.map((message) => message.id));
  for (const [id, node] of view.nodes) {
    if (!keep.has(id)) {
      node.remove();
      view.nodes.delete(id);
    }
  }
  let previous = null;
  for (const message of ordered) {
    let node = view.nodes.get(message.id);
    if (!node) {
      node = renderMessage(view, message);
      view.nodes.set(message.id, node);
    }
    const expected = previous ? previous.nextElementSibling : list.firstElementChild;
    if (expected !== node) {
      if (previous) {
        previous.after(node);
      } else {
        list.prepend(node);
      }
    }
    previous = node;
  }
  // The answer in progress: the live parts, after the history.
  if (stream.live.length > 0) {
    if (!view.liveNode) {
      view.liveNode = make("li", { className: "message assistant live", attrs: { "aria-busy": "true" } });
      view.liveNode.dataset.role = "assistant";
    }
    // Rebuilt on every part; a reasoning or tool block the user opened stays open.
    const opened = [...view.liveNode.querySelectorAll("details")].map((node) => node.open);
    view.liveNode.replaceChildren(
      make("div", { className: "role", text: "Assistant" }),
      make("div", { className: "content" }, [renderParts(stream.live.map((item) => item.part))]),
    );
    view.liveNode.querySelectorAll("details").forEach((node, index) => {
      node.open = Boolean(opened[index]);
    });
    list.append(view.liveNode);
  } else if (view.liveNode) {
    view.liveNode.remove();
    view.liveNode = null;
  }
  renderStatus(view);
  renderQueue(view);
  if (follow) {
    list.scrollTop = list.scrollHeight;
  }
}

function renderStatus(view) {
  const stream = view.stream;
  if (stream.status) {
    view.chat = { ...view.chat, status: stream.status };
  }
  refreshOpenChatSummary();
  const error = stream.error;
  if (error) {
    $("error-banner").textContent = `Error (${error.kind || "unknown"}): ${error.message}`;
  }
  show($("error-banner"), Boolean(error));
  if (stream.retry) {
    startRetryTimer(stream.retry);
  } else {
    stopRetryTimer();
  }
}

function startRetryTimer(retry) {
  const banner = $("retry-banner");
  const update = () => {
    const seconds = Math.ceil((Date.parse(retry.retrying_at) - Date.now()) / 1000);
    const why = [retry.kind, retry.provider].filter(Boolean).join(", ");
    banner.textContent = seconds > 0
      ? `Retrying in ${seconds} s (attempt ${retry.attempt}${why ? `: ${why}` : ""})`
      : `Retrying now (attempt ${retry.attempt}${why ? `: ${why}` : ""})`;
  };
  stopRetryTimer();
  update();
  show(banner, true);
  state.retryTimer = setInterval(update, 250);
}

function stopRetryTimer() {
  if (state.retryTimer !== null) {
    clearInterval(state.retryTimer);
    state.retryTimer = null;
  }
  show($("retry-banner"), false);
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", tool: "Tool", system: "System" };

function renderMessage(view, message) {
  const node = make("li", { className: `message ${message.role}` });
  node.dataset.role = message.role;
  node.dataset.messageId = String(message.id);
  const header = make("div", { className: "role", text: ROLE_NAMES[message.role] || message.role });
  const content = make("div", { className: "content" }, [
    renderParts(message.content, { plain: message.role === "user" }),
  ]);
  node.append(header, content);
  if (message.role === "user") {
    header.append(button("Edit", () => editMessage(view, message, node), { ariaLabel: "Edit message" }));
  }
  return node;
}

// Adjacent text (or reasoning) parts are one block: live deltas arrive a few words at a time.
function mergeParts(parts) {
  const merged = [];
  for (const part of parts || []) {
    const last = merged[merged.length - 1];
    if (last && (part.type === "text" || part.type === "reasoning") && last.type === part.type) {
      merged[merged.length - 1] = { ...last, text: `${last.text}${part.text || ""}` };
    } else {
      merged.push(part);
    }
  }
  return merged;
}

function renderParts(parts, { plain = false } = {}) {
  const fragment = document.createDocumentFragment();
  for (const part of mergeParts(parts)) {
    fragment.append(renderPart(part, plain));
  }
  return fragment;
}

function details(summary, className, body, open = false) {
  const node = make("details", { className }, [make("summary", { text: summary }), ...body]);
  node.open = open;
  return node;
}

function renderPart(part, plain) {
  switch (part.type) {
    case "text":
      return plain
        ? make("p", { className: "plain", text: part.text || "" })
        : make("div", { className: "markdown" }, [renderMarkdown(part.text || "")]);
    case "reasoning":
      return details("Reasoning", "reasoning", [make("p", { className: "plain", text: part.text || "" })]);
    case "tool_call":
      return details(`Tool call: ${part.name}`, "tool-call", [make("pre", { text: json(part.args) })]);
    case "tool_result": {
      const body = [make("pre", { text: json(part.result) })];
      const childId = part.result && typeof part.result.chat_id === "string" ? part.result.chat_id : null;
      if (childId && /^[0-9a-f-]{36}$/.test(childId)) {
        body.unshift(make("a", { text: "Open the sub-agent's chat", attrs: { href: `#/chats/${childId}` } }));
      }
      const label = `Result of ${part.name}${part.is_error ? " (error)" : ""}`;
      return details(label, `tool-result${part.is_error ? " is-error" : ""}`, body);
    }
    case "compaction":
      return details(
        `Earlier messages summarized (${part.compressed_count})`,
        "compaction",
        [make("div", { className: "markdown" }, [renderMarkdown(part.summary || "")])],
      );
    default:
      return make("pre", { className: "unknown-part", text: json(part) });
  }
}

function editMessage(view, message, node) {
  if (node.querySelector("form")) {
    return;
  }
  const area = make("textarea", { attrs: { rows: "3", "aria-label": "Edit message" } });
  area.value = textOf(message.content);
  const error = make("span", { className: "error", attrs: { role: "alert" } });
  const form = make("form", { className: "edit" }, [
    area,
    make("div", { className: "composer-row" }, [
      make("button", { text: "Save", attrs: { type: "submit" } }),
      button("Cancel", () => form.remove()),
      error,
    ]),
  ]);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = area.value;
    if (!content.trim()) {
      return;
    }
    try {
      // The stream answers with a history_reset, then the new message and its answer.
      await api("PATCH", `/api/v1/chats/${view.chatId}/messages/${message.id}`, { content });
      form.remove();
    } catch (failure) {
      error.textContent = describeError(failure);
    }
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      form.remove();
    }
  });
  node.append(form);
  area.focus();
}

function renderQueue(view) {
  const queue = view.stream.queue;
  // Rebuilt only when it changed: the answer re-renders many times a second, and a button
  // replaced under the pointer would swallow the click.
  const key = JSON.stringify(queue.map((item) => [item.id, item.promoted]));
  if (key === view.queueKey) {
    return;
  }
  view.queueKey = key;
  const list = $("queue");
  list.replaceChildren(...queue.map((item) => {
    const text = textOf(item.content);
    return make("li", { className: item.promoted ? "promoted" : "" }, [
      make("span", { className: "queued-text", text }),
      button("Send now", () => queueAction(view, "POST", `${item.id}/promote`), {
        ariaLabel: `Send now: ${text.slice(0, 40)}`,
      }),
      button("Delete", () => queueAction(view, "DELETE", `${item.id}`), {
        ariaLabel: `Delete queued message: ${text.slice(0, 40)}`,
      }),
    ]);
  }));
  show($("queue-section"), queue.length > 0);
}

async function queueAction(view, method, path) {
  try {
    await api(method, `/api/v1/chats/${view.chatId}/queue/${path}`);
  } catch (error) {
    $("composer-error").textContent = describeError(error);
  }
}

// ------------------------------------------------------------------------------------------
// The composer.

async function send() {
  const area = $("message");
  const content = area.value;
  if (!content.trim()) {
    return;
  }
  const sendButton = $("send");
  sendButton.disabled = true;
  $("composer-error").textContent = "";
  try {
    if (state.view) {
      await api("POST", `/api/v1/chats/${state.view.chatId}/messages`, { content });
      area.value = "";
    } else {
      const body = { content, client_type: "ui" };
      if ($("model").value) {
        body.model_config_id = $("model").value;
      }
      const chat = await api("POST", "/api/v1/chats", body);
      area.value = "";
      upsertChat(chat);
      location.hash = `#/chats/${chat.id}`;
    }
  } catch (error) {
    $("composer-error").textContent = describeError(error);
  } finally {
    sendButton.disabled = false;
    area.focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

$("message").addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter is a new line; an input method composing text keeps its Enter.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});

$("stop").addEventListener("click", async () => {
  if (!state.view) {
    return;
  }
  try {
    await api("POST", `/api/v1/chats/${state.view.chatId}/interrupt`);
  } catch (error) {
    $("composer-error").textContent = describeError(error);
  }
});

$("archive").addEventListener("click", async () => {
  const view = state.view;
  if (!view || !view.chat) {
    return;
  }
  try {
    const chat = await api("PATCH", `/api/v1/chats/${view.chatId}`, { archived: !view.chat.archived });
    upsertChat(chat);
    view.chat = { ...view.chat, ...chat };
    renderChatList();
    refreshOpenChatSummary();
  } catch (error) {
    $("composer-error").textContent = describeError(error);
  }
});

boot();
