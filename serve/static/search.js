"use strict";
// The search page: POST /search, then results built with textContent only (no HTML from data).
(() => {
  const form = document.getElementById("search-form");
  const fields = {
    query: document.getElementById("q"),
    k: document.getElementById("k"),
    mode: document.getElementById("mode"),
    collapse: document.getElementById("collapse"),
    filter: document.getElementById("filter"),
    generation: document.getElementById("generation"),
  };
  const errorBox = document.getElementById("error");
  const status = document.getElementById("status");
  const list = document.getElementById("results");
  const SNIPPET = 320;

  // Words too common to be worth a highlight.
  const STOP = new Set(
    "an and are as at be by for from has in into is it its of on or than that the to was were with".split(" "),
  );

  function terms(query) {
    const words = query.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [];
    return [...new Set(words.filter((w) => w.length >= 2 && !STOP.has(w)))];
  }

  function termPattern(words) {
    // Terms are letters and digits only, so they need no escaping; match them at the start of a word.
    return words.length ? new RegExp(`(?<![\\p{L}\\p{N}])(?:${words.join("|")})`, "giu") : null;
  }

  function snippet(text, pattern) {
    const flat = text.replace(/\s+/g, " ").trim();
    if (flat.length <= SNIPPET) return flat;
    let start = 0;
    if (pattern) {
      pattern.lastIndex = 0;
      const first = pattern.exec(flat);
      if (first && first.index > SNIPPET / 4) start = flat.lastIndexOf(" ", first.index - SNIPPET / 4) + 1;
    }
    const end = Math.min(flat.length, start + SNIPPET);
    return `${start > 0 ? "… " : ""}${flat.slice(start, end)}${end < flat.length ? " …" : ""}`;
  }

  function highlighted(element, text, pattern) {
    // Text nodes and <mark> elements: whatever the text holds, it is never parsed as HTML.
    element.replaceChildren();
    let at = 0;
    if (pattern) {
      pattern.lastIndex = 0;
      for (let m = pattern.exec(text); m; m = pattern.exec(text)) {
        if (m.index > at) element.append(document.createTextNode(text.slice(at, m.index)));
        const mark = document.createElement("mark");
        mark.textContent = m[0];
        element.append(mark);
        at = m.index + m[0].length;
      }
    }
    if (at < text.length) element.append(document.createTextNode(text.slice(at)));
    return element;
  }

  function field(label, value) {
    const item = document.createElement("span");
    const name = document.createElement("span");
    name.className = "muted";
    name.textContent = `${label} `;
    const code = document.createElement("code");
    code.textContent = value;
    item.append(name, code);
    return item;
  }

  function render(body, request) {
    const pattern = termPattern(terms(request.query));
    list.replaceChildren(
      ...body.results.map((hit) => {
        const item = document.createElement("li");
        item.className = "hit";
        const title = highlighted(document.createElement("h2"), hit.title || hit.doc_id, pattern);
        title.className = "hit-title";
        const text = highlighted(document.createElement("p"), snippet(hit.text, pattern), pattern);
        text.className = "snippet";
        const meta = document.createElement("p");
        meta.className = "hit-meta";
        meta.append(
          field("score", hit.score.toFixed(4)),
          field("doc_id", hit.doc_id),
          field("shard", hit.shard),
        );
        item.append(title, text, meta);
        return item;
      }),
    );
    const n = body.results.length;
    status.textContent =
      `${n} result${n === 1 ? "" : "s"} (${request.mode}) from generation ${body.generation}, ` +
      `took_ms ${body.took_ms.toFixed(1)}`;
  }

  // The generations of the db (GET /api/generations): the live one answers unless another is picked,
  // e.g. a re-embedded one to compare with before it is promoted.
  async function loadGenerations() {
    const result = await EP.request("/api/generations");
    if (!result.ok) return;
    const picked = fields.generation.value;
    const options = [new Option(`live (${result.data.live})`, "")];
    for (const g of result.data.generations) {
      if (g.state !== "ready") continue;
      const label = `${g.generation}: ${g.model.split("/").pop()}, ${g.shards} shards${g.live ? " (live)" : ""}`;
      options.push(new Option(label, String(g.generation)));
    }
    fields.generation.replaceChildren(...options);
    if ([...fields.generation.options].some((o) => o.value === picked)) fields.generation.value = picked;
  }

  async function search() {
    const request = {
      query: fields.query.value.trim(),
      k: Number(fields.k.value) || 10,
      mode: fields.mode.value,
    };
    if (!request.query) return;
    const filter = fields.filter.value.trim();
    if (filter) request.filter = filter;
    if (fields.generation.value) request.generation = Number(fields.generation.value);
    if (fields.collapse.checked) request.collapse = "doc_id";
    const params = new URLSearchParams({ q: request.query, k: request.k, mode: request.mode });
    if (request.collapse) params.set("collapse", "doc_id");
    if (filter) params.set("filter", filter);
    if (request.generation) params.set("generation", request.generation);
    history.replaceState(null, "", `?${params}`);
    EP.clearError(errorBox);
    status.textContent = "Searching…";
    list.setAttribute("aria-busy", "true");
    const result = await EP.request("/search", { method: "POST", body: JSON.stringify(request) });
    list.removeAttribute("aria-busy");
    if (!result.ok) {
      list.replaceChildren();
      status.textContent = "";
      EP.showError(errorBox, result);
      return;
    }
    render(result.data, request);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  EP.onKeyChange(() => {
    loadGenerations();
    if (fields.query.value.trim()) search();
  });
  fields.generation.addEventListener("focus", loadGenerations);

  // A shared link (?q=...&k=...&mode=...&filter=...) fills the form. It runs on load only without a
  // filter: a link is anyone's to write, and a filter runs with this tab's key, so it waits for a click.
  loadGenerations();
  const shared = new URLSearchParams(location.search);
  if (shared.get("q")) {
    fields.query.value = shared.get("q");
    if (shared.get("k")) fields.k.value = shared.get("k");
    if (["vector", "text", "hybrid"].includes(shared.get("mode"))) fields.mode.value = shared.get("mode");
    fields.collapse.checked = shared.get("collapse") === "doc_id";
    if (/^[0-9]{1,7}$/.test(shared.get("generation") || "")) {
      const wanted = shared.get("generation");
      fields.generation.append(new Option(wanted, wanted));
      fields.generation.value = wanted;
    }
    if (shared.get("filter")) {
      fields.filter.value = shared.get("filter");
      status.textContent = "This link sets a filter: check it, then press Search.";
    } else {
      search();
    }
  }
})();
