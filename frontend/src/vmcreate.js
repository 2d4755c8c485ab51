// The create form: fill the shape from the chosen template and warn before submitting what the
// remaining quota cannot hold (the server checks again, under the event store's lock).
const templates = Object.fromEntries(JSON.parse(document.getElementById("templates-data").textContent).map((t) => [t.name, t]));
const remaining = JSON.parse(document.getElementById("remaining-data").textContent);
const form = document.getElementById("create-form");
const warning = document.getElementById("quota-warning");
const field = (name) => form.elements[name];

function shape() {
  const t = templates[field("template").value] || {};
  const num = (name) => (field(name).value === "" ? t[name] : Number(field(name).value));
  return { vms: 1, vcpus: num("vcpus"), memory_mib: num("memory_mib"), disk_mib: num("disk_mib") };
}

function check() {
  const want = shape();
  const over = Object.entries(want).filter(([r, v]) => remaining[r] != null && v > remaining[r]);
  warning.hidden = over.length === 0;
  warning.textContent = over.map(([r, v]) => `${r}: ${v} requested, ${remaining[r]} remaining`).join("; ");
  for (const name of ["vcpus", "memory_mib", "disk_mib"]) {
    field(name).placeholder = String((templates[field("template").value] || {})[name] ?? "");
  }
}

form.addEventListener("input", check);
check();
