"use strict";
/* Markdown to DOM nodes. Model output is untrusted: every piece of it becomes a text
   node (textContent) or an element this code chose; no HTML string is ever parsed,
   so <img onerror>, <script> and the like show as text. Links keep http(s) only.

   Model output is also unbounded, and one answer is drawn again after every reload
   (it is the current chat in localStorage), so the work is bounded too: blocks nest
   at most MAX_DEPTH deep (Chromium's renderer dies at about 3,000 nested
   blockquotes), emphasis MAX_INLINE_DEPTH deep, one answer makes at most
   MAX_ELEMENTS elements and reads at most MAX_SOURCE characters as markdown. Past a
   bound, the rest is shown as plain text. Every scan is linear in its input: the
   block patterns have no two adjacent quantifiers that can take the same characters,
   and inline spans are found by one scanner that looks each closer up in a list made
   in one pass, where a lazy regex would rescan to the end for every unclosed `**`. */
const markdown = (() => {
  const MAX_DEPTH = 16, MAX_INLINE_DEPTH = 8, MAX_ELEMENTS = 10000, MAX_SOURCE = 100000, MAX_COLUMNS = 100;
  const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t](.*))?$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
  const ESCAPABLE = /[!-\/:-@\[-`{-~]/;
  const LINK_TAIL = / *<?([^\s<>()]*(?:\([^\s<>()]*\)[^\s<>()]*)*)>?(?: +"[^"\n]*")? *\)/y;
  const AUTO = /<(https?:\/\/[^\s<>]+)>/y;
  const BARE = /https?:\/\/[^\s<>()[\]]*[^\s<>()[\].,;:!?'"*_~]/y;
  const SPACE = /\s/, WORD = /\w/;

  let budget = 0;  // elements left for the answer being drawn

  function el(tag, className, text) {
    budget -= 1;
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  /** What is past a bound: shown as typed, in one element. */
  function plain(lines, parent) {
    const value = lines.join("\n");
    if (value.trim()) parent.append(el("div", "plain", value));
  }
  const indentOf = (line) => line.length - line.trimStart().length;
  const fenceOf = (line) => {
    const m = FENCE.exec(line);  // a backtick fence's info string has no backtick
    return m && !(m[1][0] === "`" && m[2].includes("`")) ? m : null;
  };
  const startsBlock = (line) => fenceOf(line) || HEADING.test(line) || RULE.test(line) ||
    QUOTE.test(line) || ITEM.test(line);

  function headingText(rest) {  // "## Title ##" -> "Title": the closing #s go
    const value = (rest || "").trim();
    let end = value.length;
    while (end && value[end - 1] === "#") end--;
    return !end || value[end - 1] === " " || value[end - 1] === "\t" ? value.slice(0, end).trimEnd() : value;
  }

  /** A table's delimiter row ("|:--|--:|"): its cells, or null. */
  function tableRule(line) {
    let row = line.trim();
    if (!row.includes("-")) return null;
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|")) row = row.slice(0, -1);
    const cells = row.split("|").map((c) => c.trim());
    return cells.every((c) => /^:?-+:?$/.test(c)) ? cells : null;
  }

  function httpUrl(href) {
    try {
      const url = new URL(href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) { return null; }
  }

  function text(value, parent) {  // "\n" inside a paragraph is a line break
    const pieces = value.split("\n");
    for (let i = 0; i < pieces.length; i++) {
      if (i && budget <= 0) { parent.append(el("span", "plain", "\n" + pieces.slice(i).join("\n"))); return; }
      if (i) parent.append(el("br"));
      if (pieces[i]) parent.append(document.createTextNode(pieces[i]));
    }
  }

  function link(href, label, source, parent, depth) {
    const url = httpUrl(href);
    if (!url) { text(source, parent); return; }  // javascript:, data:, relative: shown as typed
    const a = el("a");
    a.href = url; a.target = "_blank"; a.rel = "noopener noreferrer nofollow";
    if (label === null) a.textContent = href; else inline(label, a, depth + 1);
    parent.append(a);
  }

  /** Where each kind of span may close in `s`, in one pass: sorted positions.
      A closer's own conditions depend on it alone (the character before it, and
      for `_` the one after), so the first closer after an opener is a lookup. */
  function closers(s) {
    const found = { "**": [], "__": [], "~~": [], "*": [], "_": [] }, ticks = new Map();
    for (let q = 0; q < s.length; q++) {
      const c = s[q];
      if (c === "`") {
        let k = q;
        while (s[k] === "`") k++;
        if (!ticks.has(k - q)) ticks.set(k - q, []);
        ticks.get(k - q).push(q);
        q = k - 1;
        continue;
      }
      if (c !== "*" && c !== "_" && c !== "~") continue;
      const before = q ? s[q - 1] : " ";
      if (SPACE.test(before) || before === c) continue;
      const pair = s[q + 1] === c;
      if (c === "*") { found["*"].push(q); if (pair) found["**"].push(q); }
      else if (c === "~") { if (pair) found["~~"].push(q); }
      else {
        if (!WORD.test(s[q + 1] || "")) found["_"].push(q);
        if (pair && !WORD.test(s[q + 2] || "")) found["__"].push(q);
      }
    }
    return { found, ticks };
  }
  function firstAtOrAfter(sorted, from) {  // binary search
    let lo = 0, hi = sorted.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (sorted[mid] < from) lo = mid + 1; else hi = mid; }
    return lo < sorted.length ? sorted[lo] : -1;
  }

  /** Inline markdown of `s` into `parent`: escapes, code spans, **strong**,
      __strong__, ~~del~~, *em*, _em_, [links](url), <autolinks> and bare URLs. At a
      position the first of these that matches wins; an unclosed opener is text. */
  function inline(s, parent, depth) {
    if (depth > MAX_INLINE_DEPTH || budget <= 0) { text(s, parent); return; }
    const { found, ticks } = closers(s);
    let last = 0, p = 0, bracket = -1;
    const emit = (end, build) => { text(s.slice(last, p), parent); build(); last = p = end; };
    const wrap = (tag, inner) => { const node = el(tag); inline(inner, node, depth + 1); parent.append(node); };
    const span = (delim, tag, leftFlank) => {  // true when a span opened at p closes
      const n = delim.length, first = s[p + n];
      if (first === undefined || SPACE.test(first) || first === delim[0] || !leftFlank) return false;
      const q = firstAtOrAfter(found[delim], p + n + 1);
      if (q < 0) return false;
      emit(q + n, () => wrap(tag, s.slice(p + n, q)));
      return true;
    };
    while (p < s.length && budget > 0) {
      const c = s[p];
      const wordBefore = p > 0 && WORD.test(s[p - 1]);
      if (c === "\\" && ESCAPABLE.test(s[p + 1] || "")) {
        emit(p + 2, () => parent.append(document.createTextNode(s[p + 1])));
      } else if (c === "`") {
        let k = p;
        while (s[k] === "`") k++;
        const q = firstAtOrAfter(ticks.get(k - p) || [], k + 1);
        if (q < 0) { p = k; continue; }  // no closing run of the same length: text
        let code = s.slice(k, q).replace(/\n/g, " ");
        if (code.length > 2 && code[0] === " " && code[code.length - 1] === " " && code.trim()) code = code.slice(1, -1);
        emit(q + (k - p), () => parent.append(el("code", "", code)));
      } else if (c === "*") {
        if (!(s[p + 1] === "*" && span("**", "strong", true)) && !span("*", "em", true)) p++;
      } else if (c === "_") {
        if (!(s[p + 1] === "_" && span("__", "strong", !wordBefore)) && !span("_", "em", !wordBefore)) p++;
      } else if (c === "~") {
        if (!(s[p + 1] === "~" && span("~~", "del", true))) p++;
      } else if (c === "[") {
        if (bracket <= p) {  // the next "]" or newline, found once for a run of "["
          const close = s.indexOf("]", p + 1), newline = s.indexOf("\n", p + 1);
          bracket = close < 0 ? (newline < 0 ? s.length : newline) : newline < 0 ? close : Math.min(close, newline);
        }
        LINK_TAIL.lastIndex = bracket + 2;
        const tail = s[bracket] === "]" && s[bracket + 1] === "(" && bracket > p + 1 ? LINK_TAIL.exec(s) : null;
        if (tail) {
          const label = s.slice(p + 1, bracket), whole = s.slice(p, LINK_TAIL.lastIndex);
          emit(LINK_TAIL.lastIndex, () => link(tail[1], label, whole, parent, depth));
        } else p++;
      } else if (c === "<" || c === "h") {
        const pattern = c === "<" ? AUTO : BARE;
        pattern.lastIndex = p;
        const m = pattern.exec(s);
        if (m) emit(pattern.lastIndex, () => link(m[1] ?? m[0], null, m[0], parent, depth));
        else p++;
      } else p++;
    }
    text(s.slice(last), parent);
  }

  function codeBlock(lines, i, m, parent) {
    const fence = m[1], indent = indentOf(lines[i]), body = [];
    const lang = m[2].trim().split(/\s/)[0];
    let closed = false;
    for (i += 1; i < lines.length; i++) {
      const close = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(lines[i]);
      if (close && close[1][0] === fence[0] && close[1].length >= fence.length) { i += 1; closed = true; break; }
      body.push(lines[i].slice(Math.min(indent, indentOf(lines[i]))));
    }
    // An unclosed fence (still streaming, or cut at max tokens) runs to the end; one
    // with nothing in it yet draws nothing, not an empty block.
    if (closed || body.some((line) => line.trim())) parent.append(codeView(body.join("\n"), lang));
    return i;
  }

  function codeView(code, lang) {
    const box = el("div", "codeblock"), bar = el("div", "code-bar");
    const copy = el("button", "ghost copy-code", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(code, copy));  // chat.js
    bar.append(el("span", "lang", lang || "code"), copy);
    const pre = el("pre"), codeEl = el("code", "", code);
    if (lang) codeEl.className = "language-" + lang.replace(/[^\w+#.-]/g, "");
    pre.append(codeEl);
    box.append(bar, pre);
    return box;
  }

  function list(lines, i, parent, depth) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length, ordered = /\d/.test(first[2]);
    const listEl = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) listEl.start = parseInt(first[2], 10);
    while (i < lines.length && budget > 0) {
      let j = i;
      while (j < lines.length && !lines[j].trim()) j++;  // a blank line between items
      const m = j < lines.length ? ITEM.exec(lines[j]) : null;
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const contentIndent = indent + m[2].length + 1, body = [m[3] || ""];
      for (i = j + 1; i < lines.length; i++) {
        const line = lines[i];
        if (!line.trim()) {
          let k = i + 1;
          while (k < lines.length && !lines[k].trim()) k++;
          if (k < lines.length && indentOf(lines[k]) > indent && !(ITEM.test(lines[k]) && indentOf(lines[k]) === indent)) {
            body.push(...lines.slice(i, k).map(() => "")); i = k - 1; continue;
          }
          break;
        }
        if (indentOf(line) > indent) { body.push(line.slice(Math.min(indentOf(line), contentIndent))); continue; }
        if (startsBlock(line) || !body[body.length - 1].trim()) break;
        body.push(line.trim());  // a lazy continuation of the item's text
      }
      const li = el("li");
      blocks(body, li, depth + 1);
      listEl.append(li);
    }
    parent.append(listEl);
    return i;
  }

  function table(lines, i, aligns, parent) {
    const cells = (line) => {
      let row = line.trim();
      if (row.startsWith("|")) row = row.slice(1);
      if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
      const all = row.split(/(?<!\\)\|/).map((cell) => cell.trim());
      if (all.length > MAX_COLUMNS) all.splice(MAX_COLUMNS - 1, Infinity, all.slice(MAX_COLUMNS - 1).join(" | "));
      return all;
    };
    aligns = aligns.map((c) =>
      c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
    const row = (line, tag) => {
      const tr = el("tr");
      cells(line).forEach((cell, k) => {
        const td = el(tag);
        if (aligns[k]) td.style.textAlign = aligns[k];
        inline(cell, td, 0);
        tr.append(td);
      });
      return tr;
    };
    const wrapper = el("div", "table-wrap"), tableEl = el("table"), head = el("thead"), body = el("tbody");
    head.append(row(lines[i], "th"));
    for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim() && budget > 0; i++) body.append(row(lines[i], "td"));
    tableEl.append(head, body);
    wrapper.append(tableEl);
    parent.append(wrapper);
    return i;
  }

  function blocks(lines, parent, depth) {
    if (depth > MAX_DEPTH) { plain(lines, parent); return; }
    let i = 0, m;
    while (i < lines.length) {
      if (budget <= 0) { plain(lines.slice(i), parent); return; }
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      if ((m = fenceOf(line))) { i = codeBlock(lines, i, m, parent); continue; }
      if ((m = HEADING.exec(line))) {
        const h = el("h" + m[1].length);
        inline(headingText(m[2]), h, 0);
        parent.append(h); i++; continue;
      }
      if (RULE.test(line)) { parent.append(el("hr")); i++; continue; }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
        const quote = el("blockquote");
        blocks(inner, quote, depth + 1);
        parent.append(quote); continue;
      }
      if (ITEM.test(line)) { i = list(lines, i, parent, depth); continue; }
      const aligns = line.includes("|") && i + 1 < lines.length ? tableRule(lines[i + 1]) : null;
      if (aligns) { i = table(lines, i, aligns, parent); continue; }
      const para = [line.trim()];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) para.push(lines[i].trim());
      const p = el("p");
      inline(para.join("\n"), p, 0);
      parent.append(p);
    }
  }

  /** Markdown source -> a DocumentFragment of elements built one by one. */
  return function render(source) {
    const fragment = document.createDocumentFragment();
    source = source.replace(/\r\n?/g, "\n").replace(/\t/g, "    ");
    budget = MAX_ELEMENTS;
    blocks(source.slice(0, MAX_SOURCE).split("\n"), fragment, 0);
    if (source.length > MAX_SOURCE) plain([source.slice(MAX_SOURCE)], fragment);
    return fragment;
  };
})();
