// Small DOM helpers. Text goes in with textContent only: names, descriptions and model
// output are never parsed as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

// A composer: its form's submit and Enter in its input (Shift+Enter: a new line) send.
export function onSend(form, input, send) {
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
}

export function avatar(card) {
  const letter = card.avatar || (card.display_name || "?").trim().charAt(0).toUpperCase();
  return el("span", { class: "avatar", "aria-hidden": "true", text: letter,
                      style: { background: card.color } });
}

export function bytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KB`;
  return `${n} B`;
}

export function stats(result) {
  const parts = [`${result.totalS.toFixed(2)} s`];
  if (result.tokens !== null) {
    parts.push(`${result.tokens} tokens`);
    if (result.totalS > 0) parts.push(`${(result.tokens / result.totalS).toFixed(1)} tok/s`);
  }
  if (result.firstTokenS !== null) parts.push(`first token ${result.firstTokenS.toFixed(2)} s`);
  return parts.join(" · ");
}

// Scroll `box` to the end only if the reader is already near it.
export function follow(box, force = false) {
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}
