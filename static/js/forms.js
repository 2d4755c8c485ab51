// Form behaviour the Content-Security-Policy allows no inline handler for:
// <form data-confirm="question"> asks before it submits; <select data-autosubmit> submits its
// form when changed.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset && event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
}, true);
document.addEventListener("change", (event) => {
  const field = event.target;
  if (field.dataset && "autosubmit" in field.dataset && field.form) {
    field.form.requestSubmit ? field.form.requestSubmit() : field.form.submit();
  }
});
