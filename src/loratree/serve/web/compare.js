// The compare view: one message answered by 2-4 characters at once, side by side. The
// requests go out together, so the server's engine decodes them in one batch; the view
// reads the engine's decode steps by batch rows before and after, and shows the largest
// batch they ran in.

import { getJson, streamChat } from "./api.js";
import { avatar, el, onSend, stats } from "./dom.js";

const MIN = 2;
const MAX = 4;

export class Compare {
  constructor(app) {
    this.app = app;
    this.picks = document.getElementById("compare-picks");
    this.input = document.getElementById("compare-input");
    this.results = document.getElementById("compare-results");
    this.batch = document.getElementById("compare-batch");
    this.sendButton = document.getElementById("compare-send");
    this.stopButton = document.getElementById("compare-stop");
    this.controller = null;
    onSend(document.getElementById("compare-form"), this.input, () => this.send());
    this.stopButton.addEventListener("click", () => this.controller?.abort());
  }

  render(characters) {
    const checked = new Set(this.chosen());
    const fresh = checked.size === 0;
    this.picks.replaceChildren(...characters.map((c, i) => {
      const box = el("input", { type: "checkbox", value: c.model,
        checked: fresh ? i < 3 : checked.has(c.model),
        onchange: () => this.limit() });
      return el("label", { class: "pick", "data-model": c.model }, box, avatar(c),
                el("span", { text: c.display_name }));
    }));
    this.limit();
  }

  chosen() {
    return [...this.picks.querySelectorAll("input:checked")].map((b) => b.value);
  }

  limit() {
    const n = this.chosen().length;
    for (const box of this.picks.querySelectorAll("input")) {
      box.disabled = !box.checked && n >= MAX;
    }
    this.sendButton.disabled = n < MIN || this.controller !== null;
  }

  async send() {
    const text = this.input.value;
    const models = this.chosen();
    if (!text.trim() || this.controller || models.length < MIN) return;
    this.controller = new AbortController();
    this.stopButton.hidden = false;
    this.limit();
    this.batch.textContent = "";
    const before = await this.steps();
    const columns = models.map((m) => this.column(this.app.character(m)));
    this.results.replaceChildren(...columns.map((c) => c.node));
    const messages = [{ role: "user", content: text }];
    await Promise.all(columns.map((c) => this.answer(c, messages)));
    const after = await this.steps();
    this.controller = null;
    this.stopButton.hidden = true;
    this.limit();
    this.report(before, after, models.length);
  }

  column(character) {
    const body = el("div", { class: "bubble streaming", "aria-busy": "true" });
    const meta = el("div", { class: "meta", text: "…" });
    const node = el("article", { class: "msg bot column", "data-model": character.model,
                                 "data-state": "streaming",
                                 style: { "--accent": character.color } },
      el("header", {}, avatar(character),
         el("span", { class: "who", text: character.display_name }),
         el("span", { class: "model", text: character.model })),
      body, meta);
    return { character, node, body, meta };
  }

  async answer(column, messages) {
    let state = "done";
    try {
      const result = await streamChat({
        model: column.character.model, messages, signal: this.controller.signal,
        ...this.app.sampling(), onDelta: (piece, all) => { column.body.textContent = all; },
      });
      column.meta.textContent = stats(result);
    } catch (e) {
      if (e.name === "AbortError") {
        state = "stopped";
        column.meta.textContent = "stopped";
      } else {
        state = "error";
        column.node.classList.add("error");
        column.body.append(el("p", { class: "error-text", role: "alert", text: e.message }));
        column.meta.textContent = e.status ? `error ${e.status}` : "error";
        if (e.status === 401) this.app.askKey();
      }
    }
    column.node.dataset.state = state;
    column.body.classList.remove("streaming");
    column.body.removeAttribute("aria-busy");
  }

  async steps() {
    try {
      return (await getJson("/web/api/state")).step_rows;
    } catch {
      return null;
    }
  }

  report(before, after, n) {
    if (!before || !after) return;
    let largest = 0;
    let steps = 0;
    for (const [rows, count] of Object.entries(after)) {
      const added = count - (before[rows] || 0);
      if (added > 0) {
        largest = Math.max(largest, Number(rows));
        if (Number(rows) >= n) steps += added;
      }
    }
    this.batch.dataset.rows = String(largest);
    this.batch.textContent = largest >= n
      ? `Served together: the server decoded these ${n} answers in one batch ` +
        `(largest batch ${largest} rows; ${steps} decode steps with all of them).`
      : `Largest batch the server ran meanwhile: ${largest} rows.`;
  }
}
