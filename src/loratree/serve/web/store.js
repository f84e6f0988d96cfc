// The store view: the adapter tree (parents and children, ranks, sizes, eval metrics,
// stale marks) and the server's live state, refreshed while the view is open.

import { getJson } from "./api.js";
import { avatar, bytes, el } from "./dom.js";

const REFRESH_MS = 1500;

export class Store {
  constructor(app) {
    this.app = app;
    this.tree = document.getElementById("tree");
    this.live = document.getElementById("live");
    this.timer = null;
  }

  show(visible) {
    clearInterval(this.timer);
    this.timer = null;
    if (!visible) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  renderTree(characters, damaged) {
    const kids = new Map();
    // the base model is the trunk: every root adapter hangs from it
    const trunk = characters.find((c) => c.kind === "base");
    const known = new Set(characters.map((c) => c.model));
    for (const c of characters) {  // a node whose parent is damaged hangs from the trunk
      const key = c.kind === "base" ? "" : (known.has(c.parent) ? c.parent : trunk.model);
      if (!kids.has(key)) kids.set(key, []);
      kids.get(key).push(c);
    }
    const branch = (parent) => {
      const list = kids.get(parent) || [];
      if (!list.length) return null;
      return el("ul", { role: parent ? "group" : "tree" }, ...list.map((c) =>
        el("li", { role: "treeitem", "data-model": c.model }, this.node(c),
           branch(c.model))));
    };
    const rows = [branch("")];
    for (const d of damaged) {
      rows.push(el("p", { class: "damaged", text: `${d.name}: damaged (${d.problem})` }));
    }
    this.tree.replaceChildren(...rows.filter(Boolean));
  }

  node(c) {
    const facts = [c.kind];
    if (c.kind === "lora") facts.push(`rank ${c.rank}`);
    if (c.kind === "prefix") facts.push(`${c.rank} tokens`);
    if (c.parent) facts.push(`path rank ${c.path_rank}`);
    if (c.size) facts.push(bytes(c.size));
    for (const [k, v] of Object.entries(c.metrics || {})) facts.push(`${k} ${v.toPrecision(3)}`);
    return el("div", { class: "node" }, avatar(c),
      el("span", { class: "who", text: c.display_name }),
      el("span", { class: "model", text: c.model }),
      el("span", { class: "facts", text: facts.join(" · ") }),
      c.stale ? el("span", { class: "badge stale", text: "stale",
                             title: "an ancestor changed: retrain, or `loratree tree accept`" })
        : null,
      c.problem ? el("span", { class: "badge", text: "tree record unreadable",
                               title: c.problem }) : null);
  }

  async refresh() {
    try {
      const s = await getJson("/web/api/state");
      const steps = Object.entries(s.step_rows)
        .map(([rows, n]) => `${rows} row${rows === "1" ? "" : "s"}: ${n}`).join(", ") || "none";
      const items = [
        ["Status", s.draining ? "draining" : (s.ready ? "ready" : "engine down")],
        ["Requests in flight", `${s.in_flight} / ${s.max_in_flight}`],
        ["Waiting for a row", s.waiting],
        ["Batch rows now", s.batch_rows],
        ["Decode steps by batch rows", steps],
        ["Adapter cache", `${s.cache.hits} hits, ${s.cache.misses} misses, ` +
          `${s.cache.evictions} evictions`],
        ["Cache memory", `${bytes(s.cache.bytes)} of ${bytes(s.cache.budget)}, ` +
          `${s.cache.entries} adapters`],
        ["Context", `${s.context} tokens`],
      ];
      this.live.replaceChildren(...items.flatMap(([k, v]) =>
        [el("dt", { text: k }), el("dd", { text: String(v) })]));
    } catch (e) {
      this.live.replaceChildren(el("p", { class: "error-text", role: "alert", text: e.message }));
      if (e.status === 401) { this.app.askKey(); this.show(false); }
    }
  }
}
