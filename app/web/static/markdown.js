// A small Markdown renderer that builds DOM nodes and never HTML strings: every piece of model
// text becomes a Text node (createTextNode / textContent), so no model output can inject markup,
// whatever it contains. Links are made only for absolute http(s) URLs; anything else (javascript:,
// data:, relative paths) stays plain text.
//
// Supported: paragraphs, line breaks, # headings, fenced ``` code blocks, > quotes, - / * / 1.
// lists, --- rules, `code`, **bold**, *italic*, ~~strike~~, [text](url) and bare http(s) URLs.

export function safeUrl(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

function el(tag, children = []) {
  const node = document.createElement(tag);
  for (const child of children) {
    node.append(child);
  }
  return node;
}

function link(text, href) {
  const a = document.createElement("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.append(...inline(text));
  return a;
}

// Inline spans, by the earliest match; the text between matches stays text.
const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => { const c = el("code"); c.textContent = m[1]; return c; } },
  { re: /\*\*([^*\n]+?)\*\*/, make: (m) => el("strong", inline(m[1])) },
  // Underscores count only at word boundaries (snake_case and __dunder__ names stay text).
  { re: /(?<![\w])__([^_\n]+?)__(?![\w])/, make: (m) => el("strong", inline(m[1])) },
  { re: /~~([^~\n]+?)~~/, make: (m) => el("del", inline(m[1])) },
  { re: /\*([^*\s][^*\n]*?)\*/, make: (m) => el("em", inline(m[1])) },
  { re: /(?<![\w])_([^_\s][^_\n]*?)_(?![\w])/, make: (m) => el("em", inline(m[1])) },
  {
    re: /\[([^\]\n]+)\]\(([^)\s]+)\)/,
    make: (m) => {
      const href = safeUrl(m[2]);
      return href ? link(m[1], href) : document.createTextNode(m[0]);
    },
  },
  {
    re: /https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/,
    make: (m) => {
      const href = safeUrl(m[0]);
      return href ? link(m[0], href) : document.createTextNode(m[0]);
    },
  },
];

export function inline(text) {
  const nodes = [];
  let rest = text;
  while (rest.length > 0) {
    let best = null;
    for (const rule of INLINE) {
      const match = rule.re.exec(rest);
      if (match && (best === null || match.index < best.match.index)) {
        best = { rule, match };
      }
    }
    if (best === null) {
      nodes.push(document.createTextNode(rest));
      break;
    }
    if (best.match.index > 0) {
      nodes.push(document.createTextNode(rest.slice(0, best.match.index)));
    }
    nodes.push(best.rule.make(best.match));
    rest = rest.slice(best.match.index + best.match[0].length);
  }
  return nodes;
}

function inlineWithBreaks(lines) {
  const nodes = [];
  lines.forEach((line, index) => {
    if (index > 0) {
      nodes.push(document.createElement("br"));
    }
    nodes.push(...inline(line));
  });
  return nodes;
}

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || QUOTE.test(line) || BULLET.test(line)
    || ORDERED.test(line) || RULE.test(line);
}

// Markdown text -> a DocumentFragment.
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (absent while a code block is still streaming)
      const code = el("code");
      code.textContent = body.join("\n");
      if (fence[2]) {
        code.dataset.language = fence[2];
      }
      fragment.append(el("pre", [code]));
      continue;
    }
    if (RULE.test(line)) {
      fragment.append(el("hr"));
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      fragment.append(el(`h${Math.min(heading[1].length + 2, 6)}`, inline(heading[2])));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        quoted.push(QUOTE.exec(lines[i])[1]);
        i += 1;
      }
      fragment.append(el("blockquote", [renderMarkdown(quoted.join("\n"))]));
      continue;
    }
    if (BULLET.test(line) || ORDERED.test(line)) {
      const ordered = ORDERED.test(line);
      const pattern = ordered ? ORDERED : BULLET;
      const list = el(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number.parseInt(ORDERED.exec(line)[1], 10);
        if (start !== 1) {
          list.start = start;
        }
      }
      while (i < lines.length && pattern.test(lines[i])) {
        const match = pattern.exec(lines[i]);
        list.append(el("li", inline(ordered ? match[2] : match[1])));
        i += 1;
      }
      fragment.append(list);
      continue;
    }
    const paragraph = [];
    while (i < lines.length && lines[i].trim() !== "" && (paragraph.length === 0 || !isBlockStart(lines[i]))) {
      paragraph.push(lines[i]);
      i += 1;
    }
    fragment.append(el("p", inlineWithBreaks(paragraph)));
  }
  return fragment;
}
