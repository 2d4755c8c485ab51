// Forms with data-confirm ask before they submit: the Content-Security-Policy allows no inline
// event handlers, so the question lives here rather than in an onsubmit attribute.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset && event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
}, true);
