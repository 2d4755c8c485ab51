// The colour scheme: "auto" (the OS's preference, app.css's media query) unless the toggle in the
// header chose "light" or "dark", kept in localStorage. Loaded in <head> without defer, so the
// page is drawn in the chosen scheme from the start (the Content-Security-Policy allows no inline
// script).
(() => {
  const KEY = "theme";
  const CHOICES = ["auto", "light", "dark"];
  const stored = () => {
    try {
      const v = localStorage.getItem(KEY);
      return CHOICES.includes(v) ? v : "auto";
    } catch (e) {
      return "auto"; // storage refused (privacy settings): follow the OS
    }
  };
  const apply = (choice) => {
    if (choice === "auto") delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = choice;
  };
  const label = (button, choice) => {
    button.textContent = `Theme: ${choice}`;
    button.setAttribute("aria-label", `Colour theme: ${choice}. Change`);
    button.title = choice === "auto" ? "follows the system's light or dark setting" : `always ${choice}`;
  };
  apply(stored());
  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    button.hidden = false;
    label(button, stored());
    button.addEventListener("click", () => {
      const next = CHOICES[(CHOICES.indexOf(stored()) + 1) % CHOICES.length];
      try {
        localStorage.setItem(KEY, next);
      } catch (e) {
        /* not kept: this page still changes */
      }
      apply(next);
      label(button, next);
    });
  });
  // Another tab changed it: follow.
  window.addEventListener("storage", (event) => {
    if (event.key !== KEY) return;
    apply(stored());
    const button = document.getElementById("theme-toggle");
    if (button) label(button, stored());
  });
})();
