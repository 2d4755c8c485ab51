// Copy buttons: <button data-copy="ID"> copies the text of the element with that id through the
// Clipboard API and says so in the live region #copy-status. The button is hidden until this
// script shows it (no script, no button). Where the Clipboard API is missing (a page served over
// plain HTTP to another host is not a secure context) or refused, the text is selected instead
// and the user is asked to copy it with the keyboard.
(() => {
  const status = document.getElementById("copy-status");
  const say = (text) => { if (status) status.textContent = text; };
  const select = (element) => {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  };
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const source = document.getElementById(button.dataset.copy);
    if (!source) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      const text = source.textContent.trim();
      say("");
      try {
        if (!navigator.clipboard || !window.isSecureContext) throw new Error("no clipboard");
        await navigator.clipboard.writeText(text);
        say("Copied to the clipboard.");
      } catch (error) {
        select(source);
        say("Could not copy automatically: the token is selected, press Ctrl+C (⌘C) to copy it.");
      }
    });
  }
})();
