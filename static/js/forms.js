// Form behaviour the Content-Security-Policy allows no inline handler for:
// <form data-confirm="question"> asks before it submits; "{field}" in the question is replaced
// by what the form's control of that name holds (a select's chosen option's text), so that
// "Make carol {role}?" names the role about to be given.
// <select data-autosubmit> submits its form when changed (for filters only: a change of state
// takes an explicit button and a confirmation).
function confirmQuestion(form) {
  return form.dataset.confirm.replace(/\{(\w+)\}/g, (whole, name) => {
    const field = form.elements.namedItem(name);
    if (!field) return whole;
    if (field.tagName === "SELECT" && field.selectedIndex >= 0) {
      return field.options[field.selectedIndex].text;
    }
    return field.value;
  });
}
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset && form.dataset.confirm && !window.confirm(confirmQuestion(form))) {
    event.preventDefault();
  }
}, true);
document.addEventListener("change", (event) => {
  const field = event.target;
  if (field.dataset && "autosubmit" in field.dataset && field.form) {
    field.form.requestSubmit ? field.form.requestSubmit() : field.form.submit();
  }
});
