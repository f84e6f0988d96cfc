// The chat view: one conversation, any character per reply, streamed.

import { streamChat } from "./api.js";
import { avatar, el, follow, onSend, stats } from "./dom.js";

export class Chat {
  constructor(app) {
    this.app = app;
    this.box = document.getElementById("messages");
    this.input = document.getElementById("input");
    this.sendButton = document.getElementById("send");
    this.stopButton = document.getElementById("stop");
    this.turns = []; // {role, content, model}: what the next request sends
    this.trimFrom = 0; // turns before this one no longer fit the model's context
    this.controller = null;
    onSend(document.getElementById("composer"), this.input, () => this.send());
    this.stopButton.addEventListener("click", () => this.stop());
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") this.stop();
    });
    document.getElementById("reset").addEventListener("click", () => this.reset());
  }

  get busy() { return this.controller !== null; }

  stop() {
    if (this.controller) this.controller.abort();
  }

  reset() {
    this.stop();
    this.turns = [];
    this.trimFrom = 0;
    this.box.replaceChildren(el("p", { id: "empty-chat", class: "empty",
      text: "New conversation. Pick a character and say hello." }));
    this.input.focus();
  }

  async send() {
    const text = this.input.value;
    const character = this.app.current();
    if (!text.trim() || this.busy || !character) return;
    this.input.value = "";
    document.getElementById("empty-chat")?.remove();
    this.turns.push({ role: "user", content: text });
    const asked = el("article", { class: "msg user", "data-role": "user" },
                     el("div", { class: "bubble", text }));
    this.box.append(asked);
    const view = this.bubble(character);
    view.asked = asked;
    follow(this.box, true);
    await this.reply(character, view);
  }

  bubble(character) {
    const body = el("div", { class: "bubble streaming", "aria-busy": "true" });
    const meta = el("div", { class: "meta", text: "…" });
    const node = el("article", { class: "msg bot", "data-role": "assistant",
                                 "data-model": character.model, "data-state": "streaming",
                                 style: { "--accent": character.color } },
      el("header", {}, avatar(character),
         el("span", { class: "who", text: character.display_name }),
         el("span", { class: "model", text: character.model })),
      body, meta);
    this.box.append(node);
    return { node, body, meta };
  }

  async reply(character, view) {
    this.controller = new AbortController();
    this.setBusy(true);
    let text = "";
    try {
      const result = await this.streamFitting(character, view, (piece, all) => {
        text = all;
        view.body.textContent = all;
        follow(this.box);
      });
      this.turns.push({ role: "assistant", content: result.text, model: character.model });
      this.finish(view, "done", stats(result) + (result.finish === "length"
        ? " · hit max tokens" : ""));
    } catch (e) {
      if (e.name === "AbortError") {
        if (text) this.turns.push({ role: "assistant", content: text, model: character.model });
        this.finish(view, "stopped", "stopped");
      } else {
        view.node.classList.add("error");
        view.body.textContent = text;
        view.body.append(el("p", { class: "error-text", role: "alert", text: e.message }));
        this.finish(view, "error", (e.status ? `error ${e.status}` : "error") +
          " · your message was not sent");
        this.turns.pop();  // a turn nobody answered leaves the conversation
        view.asked.classList.add("unsent");
        if (e.status === 401) this.app.askKey();
        if (e.code === "model_not_found") this.app.load();  // the store changed
      }
    } finally {
      this.controller = null;
      this.setBusy(false);
      follow(this.box);
    }
  }

  // Stream a reply over the conversation; when it no longer fits the model's context,
  // leave out the oldest turns (a user turn always starts what is sent) and try again.
  async streamFitting(character, view, onDelta) {
    for (;;) {
      const messages = this.turns.slice(this.trimFrom)
        .map(({ role, content }) => ({ role, content }));
      try {
        return await streamChat({ model: character.model, messages, onDelta,
                                  signal: this.controller.signal, ...this.app.sampling() });
      } catch (e) {
        const next = this.turns.findIndex((t, i) => i > this.trimFrom && t.role === "user");
        if (e.code !== "context_length_exceeded" || next < 0) throw e;
        this.trimFrom = next;
        view.node.dataset.trimmed = "true";
      }
    }
  }

  finish(view, state, text) {
    view.node.dataset.state = state;
    view.body.classList.remove("streaming");
    view.body.removeAttribute("aria-busy");
    view.meta.textContent = text + (view.node.dataset.trimmed ? " · oldest turns left out to fit"
      : "");
  }

  setBusy(busy) {
    this.stopButton.hidden = !busy;
    this.sendButton.disabled = busy;
  }
}
