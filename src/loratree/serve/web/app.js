// The persona chat app: loads the characters, wires the views, tabs, settings, keyboard
// shortcuts and the API key prompt.

import { getJson, setKey } from "./api.js";
import { Chat } from "./chat.js";
import { Compare } from "./compare.js";
import { avatar, el } from "./dom.js";
import { Store } from "./store.js";

class App {
  constructor() {
    this.characters = [];
    this.selected = null;
    this.list = document.getElementById("characters");
    this.banner = document.getElementById("banner");
    this.chat = new Chat(this);
    this.compare = new Compare(this);
    this.store = new Store(this);
    this.settings();
    this.tabs();
    this.keyForm();
    document.addEventListener("keydown", (e) => this.shortcut(e));
  }

  character(model) { return this.characters.find((c) => c.model === model); }
  current() { return this.character(this.selected); }

  sampling() {
    const t = Number(document.getElementById("temperature").value);
    const n = Number(document.getElementById("max-tokens").value);
    return { temperature: Number.isFinite(t) ? t : 0,
             maxTokens: Number.isInteger(n) && n > 0 ? n : 128 };
  }

  settings() {  // ?temperature=0&max_tokens=16 preset the settings (links, tests)
    const q = new URLSearchParams(location.search);
    if (q.has("temperature")) document.getElementById("temperature").value = q.get("temperature");
    if (q.has("max_tokens")) document.getElementById("max-tokens").value = q.get("max_tokens");
  }

  async load() {
    try {
      const data = await getJson("/web/api/characters");
      this.hideBanner();
      document.getElementById("base-name").textContent = data.base;
      this.characters = data.characters;
      if (!this.current()) this.selected = (this.characters[1] || this.characters[0]).model;
      this.renderList();
      this.compare.render(this.characters);
      this.store.renderTree(this.characters, data.damaged);
      document.body.dataset.ready = "true";
    } catch (e) {
      this.showBanner(e.message);
      if (e.status === 401) this.askKey();
    }
  }

  renderList() {
    this.list.replaceChildren(...this.characters.map((c, i) => {
      const on = c.model === this.selected;
      return el("button", { type: "button", role: "radio", class: "character",
                            "aria-checked": String(on), tabindex: on ? "0" : "-1",
                            "data-model": c.model, style: { "--accent": c.color },
                            title: i < 9 ? `Alt+${i + 1}` : null,
                            onclick: () => this.select(c.model),
                            onkeydown: (e) => this.arrows(e, i) },
        avatar(c),
        el("span", { class: "names" }, el("span", { class: "who", text: c.display_name }),
           el("span", { class: "desc", text: c.description })));
    }));
  }

  select(model, focus = true) {
    this.selected = model;
    this.renderList();
    if (focus) this.list.querySelector('[aria-checked="true"]').focus();
  }

  arrows(e, i) {
    const step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1 }[e.key];
    if (!step) return;
    e.preventDefault();
    const n = this.characters.length;
    this.select(this.characters[(i + step + n) % n].model);
  }

  shortcut(e) {
    if (e.altKey && /^[1-9]$/.test(e.key)) {
      const c = this.characters[Number(e.key) - 1];
      if (c) {
        e.preventDefault();
        this.select(c.model, false);
      }
    }
  }

  tabs() {
    const tabs = [...document.querySelectorAll('[role="tab"]')];
    const open = (tab) => {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", String(on));
        t.tabIndex = on ? 0 : -1;
        document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
      }
      document.getElementById("characters-panel").hidden = tab.id !== "tab-chat";
      this.store.show(tab.id === "tab-store");
      tab.focus();
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => open(tab));
      tab.addEventListener("keydown", (e) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
        if (step) open(tabs[(i + step + tabs.length) % tabs.length]);
      });
    });
  }

  keyForm() {
    document.getElementById("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      setKey(document.getElementById("key-input").value.trim());
      document.getElementById("key-form").hidden = true;
      this.load();
    });
  }

  askKey() {
    const form = document.getElementById("key-form");
    form.hidden = false;
    document.getElementById("key-input").focus();
  }

  showBanner(text) { this.banner.textContent = text; this.banner.hidden = false; }
  hideBanner() { this.banner.hidden = true; }
}

const app = new App();
window.loratreeApp = app;  // for the browser tests and the console
app.load();
