// Review page: keep or drop each picture, then export the kept ones for `generate_dataset.py select`.
// Everything runs from the file itself (no server, no network); decisions live in localStorage.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const storageKey = "ti-review:" + data.folder;
  const grid = document.getElementById("grid");
  const filter = document.getElementById("filter");
  const cards = [];
  let state = {};
  try { state = JSON.parse(localStorage.getItem(storageKey) || "{}") || {}; } catch (e) { state = {}; }

  function save() {
    try { localStorage.setItem(storageKey, JSON.stringify(state)); } catch (e) { /* private mode */ }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function buildCard(item, index) {
    const card = el("figure", "card");
    card.tabIndex = 0;
    card.dataset.file = item.file;
    card.dataset.index = index;
    const img = el("img");
    img.loading = "lazy";
    img.src = item.file.split("/").map(encodeURIComponent).join("/");
    img.alt = item.file;
    img.title = item.prompt || item.caption || item.file;
    img.addEventListener("click", () => { cycle(item.file); card.focus(); });
    card.appendChild(img);
    const caption = el("figcaption");
    caption.appendChild(el("span", "state"));
    caption.appendChild(el("div", "name", item.file));
    if (item.reasons.length) {
      const list = el("ul", "flags");
      for (const reason of item.reasons) list.appendChild(el("li", "", reason));
      caption.appendChild(list);
    }
    const details = [];
    if (item.axis_values && item.axis_values.length) details.push(item.axis_values.join(" | "));
    if (item.seed !== undefined && item.seed !== null) details.push("seed " + item.seed);
    if (item.caption) details.push(item.caption);
    if (details.length) caption.appendChild(el("div", "details", details.join(" · ")));
    const buttons = el("div", "buttons");
    for (const [label, value] of [["Keep", "keep"], ["Drop", "drop"]]) {
      const button = el("button", "set-" + value, label);
      button.type = "button";
      button.addEventListener("click", () => { set(item.file, state[item.file] === value ? null : value); });
      buttons.appendChild(button);
    }
    caption.appendChild(buttons);
    card.appendChild(caption);
    return card;
  }

  function render(card) {
    const value = state[card.dataset.file] || "";
    card.classList.toggle("keep", value === "keep");
    card.classList.toggle("drop", value === "drop");
    card.querySelector(".state").textContent = value ? (value === "keep" ? "kept" : "dropped") : "undecided";
  }

  function visible(card) {
    const item = data.images[card.dataset.index];
    const value = state[item.file] || "undecided";
    switch (filter.value) {
      case "flagged": return item.reasons.length > 0;
      case "unflagged": return item.reasons.length === 0;
      case "all": return true;
      default: return value === filter.value;
    }
  }

  function refresh() {
    let keep = 0, drop = 0, flagged = 0;
    for (const item of data.images) {
      if (state[item.file] === "keep") keep++;
      if (state[item.file] === "drop") drop++;
      if (item.reasons.length) flagged++;
    }
    const total = data.images.length;
    document.getElementById("counts").textContent =
      `${keep} kept · ${drop} dropped · ${total - keep - drop} undecided · ${flagged} flagged · ${total} images`;
    for (const card of cards) {
      render(card);
      card.classList.toggle("hidden", !visible(card));
    }
  }

  function set(file, value) {
    if (value) state[file] = value; else delete state[file];
    save();
    refresh();
  }

  function cycle(file) {
    const next = { undefined: "keep", keep: "drop", drop: null }[state[file]];
    set(file, next);
  }

  function selection() {
    const pick = (value) => data.images.filter((i) => (state[i.file] || "undecided") === value).map((i) => i.file);
    return {
      format: "ti-toolkit-selection",
      version: 1,
      folder: data.folder,
      keep: pick("keep"),
      drop: pick("drop"),
      undecided: pick("undecided"),
    };
  }

  function exportSelection() {
    const text = JSON.stringify(selection(), null, 1) + "\n";
    const panel = document.getElementById("export-panel");
    document.getElementById("selection-json").value = text;
    panel.hidden = false;
    const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    const link = el("a");
    link.href = url;
    link.download = "selection.json";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function toggleHelp() {
    const help = document.getElementById("help");
    help.hidden = !help.hidden;
  }

  function visibleCards() { return cards.filter((c) => !c.classList.contains("hidden")); }

  function move(card, key) {
    const shown = visibleCards();
    if (!shown.length) return;
    let at = shown.indexOf(card);
    if (at < 0) { shown[0].focus(); return; }
    const top = shown[0].offsetTop;
    let columns = shown.findIndex((c) => c.offsetTop !== top);
    if (columns < 1) columns = shown.length;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns, ArrowDown: columns }[key];
    at = Math.min(shown.length - 1, Math.max(0, at + step));
    shown[at].focus();
    shown[at].scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.tagName === "TEXTAREA" || event.target.tagName === "SELECT") return;
    const card = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".card") : null;
    const file = card ? card.dataset.file : null;
    const key = event.key;
    if (key.startsWith("Arrow")) { move(card, key); event.preventDefault(); return; }
    if (key === "e") { exportSelection(); return; }
    if (key === "?") { toggleHelp(); return; }
    if (key === "f") { filter.value = filter.value === "flagged" ? "all" : "flagged"; refresh(); return; }
    if (!file) return;
    if (key === "k") set(file, "keep");
    else if (key === "d") set(file, "drop");
    else if (key === "u") set(file, null);
    else if (key === " ") cycle(file);
    else return;
    event.preventDefault();
  });

  document.getElementById("export").addEventListener("click", exportSelection);
  document.getElementById("help-toggle").addEventListener("click", toggleHelp);
  document.getElementById("reset").addEventListener("click", () => {
    if (confirm("Forget every keep/drop decision on this page?")) { state = {}; save(); refresh(); }
  });
  document.getElementById("keep-unflagged").addEventListener("click", () => {
    for (const item of data.images) if (!item.reasons.length && !state[item.file]) state[item.file] = "keep";
    save();
    refresh();
  });
  filter.addEventListener("change", refresh);
  document.getElementById("select-command").textContent = data.select_command;

  data.images.forEach((item, index) => {
    const card = buildCard(item, index);
    cards.push(card);
    grid.appendChild(card);
  });
  refresh();
  document.body.dataset.ready = "1";
})();
