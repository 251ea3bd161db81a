// The page's HTTP client: JSON requests to /api/v1 with the session cookie (sent by the browser)
// and the session's CSRF token on every request that changes state. Every request has a
// deadline; a 401 anywhere means the session ended, and the app is told so.

const REQUEST_TIMEOUT_MS = 15000;
const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);

let csrfToken = null;
let onUnauthorized = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    const message = (body && typeof body.message === "string") ? body.message : `HTTP ${status}`;
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function setCsrfToken(token) {
  csrfToken = token;
}

export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

// `quiet401`: the caller handles a 401 itself (logging in, asking who is logged in).
export async function api(method, path, body, { quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  if (UNSAFE.has(method) && csrfToken) {
    headers["X-CSRF-Token"] = csrfToken;
  }
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
    signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
  let data = null;
  if (response.status !== 204 && response.status !== 304) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    if (response.status === 401 && !quiet401) {
      onUnauthorized();
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

// A human sentence for a failed request.
export function describeError(error) {
  if (error instanceof ApiError) {
    const detail = error.body && typeof error.body.detail === "string" ? ` (${error.body.detail})` : "";
    return `${error.message}${detail}`;
  }
  if (error && error.name === "TimeoutError") {
    return "the server did not answer in time";
  }
  return "the server cannot be reached";
}
