// Layout help the stylesheet cannot give: every table of the dashboard sits in its own
// horizontally scrolling box, so that on a phone the table scrolls and the page does not. The
// box is a labelled region, focusable (for keyboard scrolling) only while it does scroll.
(() => {
  const boxes = [];
  const heading = (table) => {
    if (table.getAttribute("aria-label")) return table.getAttribute("aria-label");
    if (table.caption) return table.caption.textContent.trim();
    for (let node = table.parentElement; node; node = node.parentElement) {
      const h = node.querySelector("h1, h2, h3");
      if (h && (h.compareDocumentPosition(table) & Node.DOCUMENT_POSITION_FOLLOWING)) return h.textContent.trim();
    }
    return "";
  };
  const update = () => {
    for (const box of boxes) {
      if (box.scrollWidth > box.clientWidth + 1) box.setAttribute("tabindex", "0");
      else box.removeAttribute("tabindex");
    }
  };
  const wrap = () => {
    for (const table of document.querySelectorAll("main table")) {
      if (table.parentElement.classList.contains("table-scroll")) continue;
      const box = document.createElement("div");
      box.className = "table-scroll";
      box.setAttribute("role", "region");
      box.setAttribute("aria-label", `${heading(table) || "table"} (scrolls sideways)`);
      table.before(box);
      box.append(table);
      boxes.push(box);
    }
    update();
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wrap);
  else wrap();
  window.addEventListener("resize", update);
  if (window.ResizeObserver) new ResizeObserver(update).observe(document.documentElement);
})();
