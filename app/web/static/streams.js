// The page's two kinds of streams (docs/api.md, "Streams"; docs/web.md):
//
// - ChatStream: one chat's events over SSE, assembled as docs/api.md says (messages by id, the
//   live parts of the step in progress, retry / history_reset drop the live parts), with the
//   cursor of the last event kept. When the connection drops (a network cut, a replica restart,
//   a final `shutdown` / `unavailable` / `resync` event) the stream is reopened from that cursor
//   with `?after=`, after a backoff, on whatever replica answers: the server sends exactly what
//   came after it, so nothing is shown twice and nothing is missed. Before reopening, one plain
//   GET of the chat tells what an EventSource cannot: 401 (logged out) and 404 (gone).
// - WatchStream: the caller's chat-list changes; after (re)connecting the list is read again.

import { ApiError, api } from "./api.js";

const CHAT_EVENTS = ["message", "message_part", "retry", "status", "error", "queue", "history_reset"];
// Final `error` events that end a stream but say nothing about the chat: reconnect.
const STREAM_ERROR_KINDS = new Set(["shutdown", "unavailable", "resync"]);
const BACKOFF_INITIAL_MS = 250;
const BACKOFF_MAX_MS = 5000;

class Backoff {
  constructor() {
    this.delay = 0;
  }

  next() {
    this.delay = this.delay === 0 ? BACKOFF_INITIAL_MS : Math.min(this.delay * 2, BACKOFF_MAX_MS);
    // Jitter, so that the tabs of many users do not all come back in the same instant.
    return this.delay / 2 + Math.random() * (this.delay / 2);
  }

  reset() {
    this.delay = 0;
  }
}

export class ChatStream {
  // handlers: onChange(stream), onConnection(connected), onGone(reason: "not_found" | "deleted")
  constructor(chatId, handlers) {
    this.chatId = chatId;
    this.handlers = handlers;
    this.cursor = null;
    this.messages = new Map();
    this.live = [];
    this.status = null;
    this.version = -1;
    this.queue = [];
    this.retry = null;
    this.error = null;
    this.source = null;
    this.timer = null;
    this.closed = false;
    this.backoff = new Backoff();
  }

  start() {
    this.open();
  }

  open() {
    if (this.closed) {
      return;
    }
    const query = this.cursor ? `?after=${encodeURIComponent(this.cursor)}` : "";
    const source = new EventSource(`/api/v1/chats/${this.chatId}/stream${query}`);
    this.source = source;
    for (const type of CHAT_EVENTS) {
      source.addEventListener(type, (event) => {
        if (this.source !== source) {
          return;
        }
        // An `error` event of the protocol (a MessageEvent with data) and a connection error
        // of the EventSource (a plain Event) share the name.
        if (event instanceof MessageEvent) {
          this.receive(type, event);
        } else if (type === "error") {
          this.reconnect();
        }
      });
    }
    source.addEventListener("open", () => {
      if (this.source === source) {
        this.backoff.reset();
        this.handlers.onConnection(true);
      }
    });
  }

  // Drop this connection and open a new one from the cursor after a backoff. The browser's own
  // retry is not used: it cannot tell a 401 or a 404 from a network error.
  reconnect() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
    if (this.closed || this.timer !== null) {
      return;
    }
    this.handlers.onConnection(false);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.probeAndOpen();
    }, this.backoff.next());
  }

  async probeAndOpen() {
    try {
      await api("GET", `/api/v1/chats/${this.chatId}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        this.close();
        this.handlers.onGone("not_found");
        return;
      }
      if (error instanceof ApiError && error.status === 401) {
        this.close(); // the app shows the login form
        return;
      }
      this.reconnect();
      return;
    }
    this.open();
  }

  receive(type, event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (event.lastEventId) {
      this.cursor = event.lastEventId;
    }
    switch (type) {
      case "message":
        this.messages.set(data.message.id, data.message);
        this.live = [];
        this.retry = null;
        break;
      case "message_part":
        this.live.push({ role: data.role, part: data.part });
        this.retry = null;
        break;
      case "retry":
        this.live = [];
        this.retry = data;
        break;
      case "history_reset":
        for (const id of [...this.messages.keys()]) {
          if (id >= data.from_message_id) {
            this.messages.delete(id);
          }
        }
        this.live = [];
        break;
      case "status":
        if (data.version >= this.version) {
          this.version = data.version;
          this.status = data.status;
          if (data.status !== "error") {
            this.error = null;
          }
          if (data.status !== "running" && data.status !== "pending") {
            this.retry = null;
          }
        }
        break;
      case "queue":
        this.queue = data.queued;
        break;
      case "error":
        if (STREAM_ERROR_KINDS.has(data.kind)) {
          // The server ends this stream (shutting down, fell behind, failed): come back from
          // the cursor, on any replica.
          this.reconnect();
          return;
        }
        if (data.kind === "deleted") {
          this.close();
          this.handlers.onGone("deleted");
          return;
        }
        this.error = data;
        break;
      default:
        return;
    }
    this.handlers.onChange(this);
  }

  // The history in id order (message ids only grow).
  orderedMessages() {
    return [...this.messages.values()].sort((a, b) => a.id - b.id);
  }

  close() {
    this.closed = true;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }
}

const WATCH_EVENTS = ["created", "updated", "deleted", "resync"];

export class WatchStream {
  // handlers: onEvent(data), onConnected() (list again now), onConnection(connected)
  constructor(handlers) {
    this.handlers = handlers;
    this.source = null;
    this.timer = null;
    this.closed = false;
    this.backoff = new Backoff();
  }

  start() {
    this.open();
  }

  open() {
    if (this.closed) {
      return;
    }
    const source = new EventSource("/api/v1/chats/watch");
    this.source = source;
    for (const type of WATCH_EVENTS) {
      source.addEventListener(type, (event) => {
        if (this.source !== source) {
          return;
        }
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          return;
        }
        if (type === "resync") {
          // Changes may have been missed: list again (after an overflow the server also ends
          // the stream, and the error handler reconnects).
          this.handlers.onConnected();
          return;
        }
        this.handlers.onEvent(data);
      });
    }
    source.addEventListener("open", () => {
      if (this.source === source) {
        this.backoff.reset();
        this.handlers.onConnection(true);
        // Subscribed first, listed second: no change falls between the two.
        this.handlers.onConnected();
      }
    });
    source.addEventListener("error", () => {
      if (this.source === source) {
        this.reconnect(); // the watch protocol has no `error` event: this is the connection
      }
    });
  }

  reconnect() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
    if (this.closed || this.timer !== null) {
      return;
    }
    this.handlers.onConnection(false);
    this.timer = setTimeout(async () => {
      this.timer = null;
      try {
        await api("GET", "/api/v1/sessions/current");
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) {
          this.close();
          return;
        }
        this.reconnect();
        return;
      }
      this.open();
    }, this.backoff.next());
  }

  close() {
    this.closed = true;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }
}
