// A fork's page: follows the API's fork status (the section's data-status-url) every second
// until none of its new VMs is pending, updating the progress bar, the counts and each row.
(() => {
  const section = document.getElementById("fork");
  if (!section || section.dataset.done === "1") return;
  const bar = document.getElementById("fork-progress");
  const summary = document.getElementById("fork-summary");
  const snapshot = document.getElementById("fork-snapshot-state");
  const poll = async () => {
    let status;
    try {
      const response = await fetch(section.dataset.statusUrl, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) return;
      status = await response.json();
    } catch (error) {
      setTimeout(poll, 3000);
      return;
    }
    bar.value = status.settled;
    for (const key of ["running", "failed", "pending", "other"]) {
      const cell = summary.querySelector(`[data-count="${key}"]`);
      if (cell) cell.textContent = String(status[key]);
    }
    if (snapshot) snapshot.textContent = status.snapshot.state || "?";
    for (const vm of status.vms) {
      const row = document.querySelector(`tr[data-vm="${vm.id}"]`);
      if (!row) continue;
      for (const field of ["state", "phase", "last_error"]) {
        const cell = row.querySelector(`[data-field="${field}"]`);
        if (cell) cell.textContent = vm[field] || "—";
      }
    }
    if (!status.done) setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
})();
